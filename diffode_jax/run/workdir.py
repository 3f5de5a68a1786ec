"""Every file the runner writes in a workdir (layout: ``diffode_jax.paths``; storage, local
or gs://: ``diffode_jax.storage``): the start-up checks, atomic JSON, metrics.jsonl (+
TensorBoard) and eval/per_image.jsonl rows.

Nothing here is half-written by a kill: JSON files are replaced atomically, JSON-lines
files are read back up to their last complete line (in a bucket, where objects cannot be
appended, they are rewritten whole at each flush: ``storage.JsonLines``).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import socket
import struct
import time

import jax

from diffode_jax import paths, storage
from diffode_jax.errors import WorkdirError

# In a bucket every flush of metrics.jsonl and of the TensorBoard events rewrites the whole
# object, so they are flushed at most this often, and always before a checkpoint is saved
# (a resumed run drops the rows after its checkpoint anyway) and at the end.
REMOTE_FLUSH_SECONDS = 30.0
_WRITERS = itertools.count()


def check_writable(workdir: str) -> None:
  """Raises WorkdirError unless workdir is (or can be created as) a writable directory.

  Changes nothing; ``ensure`` then creates it and really writes. A gs:// workdir's bucket
  must exist and be readable (whether it is writable, ``ensure``'s probe finds out).
  """
  paths.check_supported(workdir)
  try:
    reason = storage.directory_problem(workdir)
  except OSError as e:
    reason = f"cannot be checked: {storage.describe(e)}"
  if reason:
    raise WorkdirError(f"workdir {workdir!r} {reason}")


def ensure(workdir: str, subdirs=()) -> None:
  """Creates workdir and checks that this process can write a file into it and into each
  of ``subdirs`` that exists (e.g. checkpoints/, which may be read-only on its own)."""
  for directory in [workdir] + [storage.join(workdir, d) for d in subdirs]:
    try:
      if directory != workdir and not storage.isdir(directory):
        continue
      storage.makedirs(directory)
      probe = storage.join(directory, f".write_test.{jax.process_index()}.{os.getpid()}")
      storage.write_text(probe, "ok")
      storage.remove(probe)
    except OSError as e:
      raise WorkdirError(f"{directory!r} is not writable: {storage.describe(e)}") from None


class NewEntries:
  """Which of ``entries`` (files or folders of a workdir) did not exist when a run started,
  so that a run that fails or stops before it saves anything can remove what it created
  and put back the small files it rewrites (``restore``: e.g. config.json of a resumed
  run) with ``remove``, leaving the workdir as it was. ``keep()`` once the run has results."""

  def __init__(self, workdir: str, entries, restore=()):
    self.kept = jax.process_index() != 0  # process 0 alone writes these
    self.new = [] if self.kept else [e for e in entries if not storage.exists(e)]
    self.saved = {} if self.kept else {p: storage.read_bytes(p) for p in restore
                                       if storage.isfile(p)}

  def keep(self) -> None:
    self.kept = True

  def remove(self) -> None:
    for entry in self.new:
      try:
        if storage.isfile(entry):
          storage.remove(entry)
        elif storage.exists(entry):
          for name in storage.walk_files(entry):
            storage.remove(storage.join(entry, name))
          _remove_empty_dirs(entry)
      except OSError:  # best effort: the error that ended the run is what matters
        pass
    for p, data in self.saved.items():
      try:
        storage.write_bytes(p, data)
      except OSError:
        pass


def _remove_empty_dirs(root: str) -> None:
  if storage.is_remote(root) or not os.path.isdir(root):
    return
  for here, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
    os.rmdir(here)


def saved_config(workdir: str):
  """The workdir's finalized config.json, or None if it has none.

  A config.json that is not valid JSON raises WorkdirError (never overwritten: it may be
  the only record of how the checkpoints were made).
  """
  from diffode_jax.config import read_workdir_config
  from diffode_jax.errors import CheckpointError

  if not storage.exists(paths.config_path(workdir)):
    return None
  try:
    return read_workdir_config(workdir)
  except CheckpointError as e:
    raise WorkdirError(f"{e}; not overwriting it: move it away or use another "
                       f"workdir") from None


def checkpoint_steps(workdir: str) -> list:
  """The committed checkpoint steps in checkpoints/: folders named by an integer (orbax
  renames a local step into place when complete); in a bucket, those that hold orbax's
  commit_success.txt (written last)."""
  directory = paths.checkpoint_dir(workdir)
  if not storage.isdir(directory):
    return []
  steps = sorted(int(n) for n in storage.listdir(directory) if n.isdigit())
  if storage.is_remote(directory):
    steps = [s for s in steps
             if storage.exists(storage.join(directory, str(s), "commit_success.txt"))]
  return steps


def has_checkpoint(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir))


def logged_losses(workdir: str, up_to_step: int) -> dict:
  """step -> logged training loss of metrics.jsonl rows up to ``up_to_step``."""
  return {r["step"]: r["loss"] for r in read_jsonl(paths.metrics_path(workdir))
          if isinstance(r, dict) and "loss" in r and isinstance(r.get("step"), int)
          and r["step"] <= up_to_step}


def write_json(path: str, obj) -> None:
  """Writes atomically (temp file + rename, or one object write) so a kill never leaves
  half a file."""
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True))


read_jsonl = storage.read_jsonl
write_jsonl = storage.write_jsonl


# ----------------------------------------------------------------------------- metrics


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl rows after ``step`` (and a row cut by a kill): a resumed run
  rewrites them, so each step appears once."""
  path = paths.metrics_path(workdir)
  if not storage.exists(path):
    return
  keep = []
  for line in storage.read_text(path).splitlines(keepends=True):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and row.get("step", 0) <= step:
      keep.append(row)
  write_jsonl(path, keep)


class MetricsWriter:
  """metrics.jsonl and TensorBoard scalars (``EventFile``), local or gs://.

  Locally each row is flushed as it is written. In a bucket rows are flushed at most every
  ``REMOTE_FLUSH_SECONDS``; ``flush`` forces it (before a checkpoint is saved), and so
  does ``close``.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = paths.metrics_path(workdir)
    self.remote = storage.is_remote(workdir)
    self.rows = storage.JsonLines(self.path)
    storage.touch(self.path)  # metrics.jsonl exists from the start, rows or not
    self._last_flush = time.monotonic()
    self.tb = EventFile(paths.tensorboard_dir(workdir)) if tensorboard else None

  def write(self, row: dict) -> None:
    self.rows.add([row])
    if self.tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.scalar(k, v, row["step"])
    if not self.remote or time.monotonic() - self._last_flush >= REMOTE_FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    self.rows.flush()
    if self.tb:
      self.tb.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()


class EventFile:
  """A TensorBoard event file of scalars, written through ``storage.GrowingFile`` (appended
  locally, rewritten whole at each flush in a bucket), so it lands where the workdir is,
  local or gs://, by the same code the rest of the workdir uses.

  The format is tf.summary's: TFRecords (length, masked CRC-32C, data, masked CRC-32C) of
  ``Event`` protos, the first naming the file version, then one scalar per event. The
  protos and the checksum come from the tensorboard package, which needs no TensorFlow.
  """

  def __init__(self, directory: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
    storage.makedirs(directory)
    # Like tf.summary's names; pid and a counter keep two writers of one second apart.
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_WRITERS)}")
    self.path = storage.join(directory, name)
    self.file = storage.GrowingFile(self.path, existing=b"")
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.file.flush()

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self.file.add(header + struct.pack("<I", self._crc(header)) + data +
                  struct.pack("<I", self._crc(data)))

  def scalar(self, tag: str, value: float, step: int) -> None:
    summary = self._summary_pb2.Summary(
        value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    self.file.flush()


# ----------------------------------------------------------------------------- per-image rows


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
    self.name = None
    self.rows = None

  def start(self, header: dict, num_images: int, batch_size: int) -> int:
    self._adopt_unnamed()
    self.name = evaluation_name(header, num_images)
    self.rows = PerImageRows(self.workdir, self.name)
    first_batch = self.rows.start(header, num_images, batch_size)
    self._record(self.name, {**_pick(header), "num_images": num_images, "finished": False})
    return first_batch

  def finish(self, report: dict) -> None:
    directory = paths.evaluation_dir(self.workdir, self.name)
    write_json(storage.join(directory, "bpd.json"), {**report, "evaluation": self.name})
    top = paths.eval_dir(self.workdir)
    storage.write_bytes(storage.join(top, "per_image.jsonl"),
                        storage.read_bytes(self.rows.path))
    write_json(storage.join(top, "bpd.json"), {**report, "evaluation": self.name})
    self._record(self.name, {**_pick(report), "finished": True}, latest=True)

  def _record(self, name: str, entry: dict, latest: bool = False) -> None:
    index = read_index(self.workdir)
    index["evaluations"][name] = {**entry, "updated": _now()}
    if latest:
      index["latest"] = name
    write_json(paths.eval_index_path(self.workdir), index)

  def _adopt_unnamed(self) -> None:
    """Moves a pre-index eval/per_image.jsonl (and its bpd.json) under its name."""
    top = paths.eval_dir(self.workdir)
    rows_path = storage.join(top, "per_image.jsonl")
    if storage.exists(paths.eval_index_path(self.workdir)) or not storage.exists(rows_path):
      return
    lines = storage.read_jsonl(rows_path)
    if not lines or not isinstance(lines[0], dict) or "header" not in lines[0]:
      return
    header, count = lines[0]["header"], lines[0].get("num_images", len(lines) - 1)
    name = evaluation_name(header, count)
    directory = paths.evaluation_dir(self.workdir, name)
    storage.makedirs(directory)
    storage.write_bytes(storage.join(directory, "per_image.jsonl"),
                        storage.read_bytes(rows_path))
    report_path = storage.join(top, "bpd.json")
    entry = {**_pick(header), "num_images": count, "finished": False}
    if storage.exists(report_path):
      report = json.loads(storage.read_text(report_path))
      write_json(storage.join(directory, "bpd.json"), {**report, "evaluation": name})
      entry = {**entry, **_pick(report), "finished": True}
    index = {"latest": name if entry["finished"] else None,
             "evaluations": {name: {**entry, "updated": _now()}}}
    write_json(paths.eval_index_path(self.workdir), index)


read_index = paths.read_eval_index


def newest_rows_path(workdir: str):
  """per_image.jsonl of the evaluation started or finished last (None before the first)."""
  entries = read_index(workdir)["evaluations"]
  if not entries:
    return None
  name = max(entries, key=lambda n: entries[n]["updated"])
  return storage.join(paths.evaluation_dir(workdir, name), "per_image.jsonl")


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
    self.path = storage.join(self.directory, "per_image.jsonl")
    self.rows: list = []
    self._file = None

  def start(self, header: dict, num_images: int, batch_size: int) -> int:
    """Returns the index of the first batch still to compute."""
    storage.makedirs(self.directory)
    lines = read_jsonl(self.path)
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

  def _rewrite(self, header, num_images):
    lines = [{"header": header, "num_images": num_images}] + self.rows
    write_jsonl(self.path, lines)
    self._file = storage.JsonLines(self.path, existing_rows=lines)

  def add(self, rows: list) -> None:
    self._file.add(rows)
    self._file.flush()
    self.rows.extend(rows)
