"""eval/ of a workdir: every evaluation under its own name (``Evaluations``), eval/index.json
listing them, and the resumable per-image rows of one evaluation (``PerImageRows``).
Nothing here is half-written by a kill: JSON files are replaced atomically and
per_image.jsonl is read back up to its last complete line (``storage.read_jsonl``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re

from diffode_jax import paths, storage
from diffode_jax.run.workdir import write_json


def evaluation_name(header: dict, num_images: int) -> str:
  """The directory name of an evaluation: readable settings and a digest of every field
  that changes a row (``header``), so two evaluations share a directory only when one is
  the other resumed. E.g. ``test-step3000-tn-K1-n360-3f9a0c1d2b4e``."""
  step = header.get("checkpoint_step")
  digest = hashlib.sha256(json.dumps([header, num_images], sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]
  parts = [str(header.get("split", "split")),
           "oracle" if step is None else f"step{step}",
           str(header.get("dequantization")), f"K{header.get('num_importance')}",
           f"n{num_images}", digest]
  return "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", p) for p in parts)


# What index.json keeps of each evaluation's header and report.
INDEX_FIELDS = ("checkpoint_step", "split", "dataset", "dequantization", "num_importance",
                "divergence", "solver", "rtol", "atol", "params_fingerprint", "num_images",
                "bpd", "bpd_stderr", "sde_bpd", "nfe_mean")


class Evaluations:
  """eval/: every evaluation of a workdir under its own name, and index.json listing them.

  ``start(header, num_images, batch_size)`` opens the evaluation's directory (resuming its
  finished batches, ``PerImageRows``) and lists it as unfinished; ``finish(report)``
  writes its bpd.json, copies its two files to eval/bpd.json and eval/per_image.jsonl
  (the latest finished evaluation, where a user looks first) and records it as the
  index's ``latest``. Evaluations of other settings, checkpoints or images are never
  touched. A workdir written before evaluations had names has its one evaluation moved
  under its name first.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.name: str | None = None
    self.rows: PerImageRows | None = None

  def start(self, header: dict, num_images: int, batch_size: int) -> int:
    self._adopt_unnamed()
    self.name = name = evaluation_name(header, num_images)
    self.rows = rows = PerImageRows(self.workdir, name)
    first_batch = rows.start(header, num_images, batch_size)
    self._record(name, {**_pick(header), "num_images": num_images, "finished": False})
    return first_batch

  def finish(self, report: dict) -> None:
    if self.name is None or self.rows is None:
      raise RuntimeError("Evaluations.finish before start")
    name = self.name
    write_json(paths.eval_report_path(self.workdir, name), {**report, "evaluation": name})
    storage.write_bytes(paths.eval_rows_path(self.workdir), storage.read_bytes(self.rows.path))
    write_json(paths.eval_report_path(self.workdir), {**report, "evaluation": name})
    self._record(name, {**_pick(report), "finished": True}, latest=True)

  def _record(self, name: str, entry: dict, latest: bool = False) -> None:
    index = read_index(self.workdir)
    index["evaluations"][name] = {**entry, "updated": _now()}
    if latest:
      index["latest"] = name
    write_json(paths.eval_index_path(self.workdir), index)

  def _adopt_unnamed(self) -> None:
    """Moves a pre-index eval/per_image.jsonl (and its bpd.json) under its name."""
    rows_path = paths.eval_rows_path(self.workdir)
    if storage.exists(paths.eval_index_path(self.workdir)) or not storage.exists(rows_path):
      return
    lines = storage.read_jsonl(rows_path)
    if not lines or not isinstance(lines[0], dict) or "header" not in lines[0]:
      return
    header, count = lines[0]["header"], lines[0].get("num_images", len(lines) - 1)
    name = evaluation_name(header, count)
    directory = paths.evaluation_dir(self.workdir, name)
    storage.makedirs(directory)
    storage.write_bytes(paths.eval_rows_path(self.workdir, name), storage.read_bytes(rows_path))
    report_path = paths.eval_report_path(self.workdir)
    entry = {**_pick(header), "num_images": count, "finished": False}
    if storage.exists(report_path):
      report = json.loads(storage.read_text(report_path))
      write_json(paths.eval_report_path(self.workdir, name), {**report, "evaluation": name})
      entry = {**entry, **_pick(report), "finished": True}
    index = {"latest": name if entry["finished"] else None,
             "evaluations": {name: {**entry, "updated": _now()}}}
    write_json(paths.eval_index_path(self.workdir), index)


read_index = paths.read_eval_index


def newest_rows_path(workdir: str) -> str | None:
  """per_image.jsonl of the evaluation started or finished last (None before the first)."""
  entries = read_index(workdir)["evaluations"]
  if not entries:
    return None
  name = max(entries, key=lambda n: entries[n]["updated"])
  return paths.eval_rows_path(workdir, name)


def _pick(fields: dict) -> dict:
  return {k: fields[k] for k in INDEX_FIELDS if k in fields}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class PerImageRows:
  """per_image.jsonl of one evaluation: a header (every field that changes a row) and one
  row per image.

  ``start(header, num_images, batch_size)`` keeps the rows of an earlier evaluation with
  the same header (a resumed evaluation) and rewrites the file with them: whole batches
  of ``batch_size`` only (batch b's rows depend on the header alone), and the last,
  shorter batch only if the earlier run had the same number of images (its noise has
  the shape of that batch). ``add`` adds a finished batch (appended locally; in a bucket
  the object is rewritten whole with it).
  """

  def __init__(self, workdir: str, name: str):
    self.directory = paths.evaluation_dir(workdir, name)
    self.path = paths.eval_rows_path(workdir, name)
    self.rows: list = []
    self._file: storage.JsonLines | None = None

  def start(self, header: dict, num_images: int, batch_size: int) -> int:
    """Returns the index of the first batch still to compute."""
    storage.makedirs(self.directory)
    lines = storage.read_jsonl(self.path)
    done = []
    if lines and isinstance(lines[0], dict) and lines[0].get("header") == header:
      done = sorted(lines[1:], key=lambda r: r["index"])
      done = [r for i, r in enumerate(done) if r["index"] == i]
      if len(done) >= num_images and lines[0].get("num_images") == num_images:
        self.rows = done[:num_images]
        self._rewrite(header, num_images)
        return -(-num_images // batch_size)
    first_batch = min(len(done), num_images) // batch_size
    self.rows = done[:first_batch * batch_size]  # a batch cut short by a kill is redone
    self._rewrite(header, num_images)
    return first_batch

  def _rewrite(self, header: dict, num_images: int) -> None:
    lines = [{"header": header, "num_images": num_images}] + self.rows
    storage.write_jsonl(self.path, lines)
    self._file = storage.JsonLines(self.path, existing_rows=lines)

  def add(self, rows: list) -> None:
    if self._file is None:
      raise RuntimeError("PerImageRows.add before start")
    self._file.add(rows)
    self._file.flush()
    self.rows.extend(rows)
