"""Every file the runner writes in a workdir (layout: ``diffode_jax.paths``): the start-up
checks, atomic JSON, metrics.jsonl (+ TensorBoard) and eval/per_image.jsonl rows.

Nothing here is half-written by a kill: JSON files are replaced atomically, JSON-lines
files are read back up to their last complete line.
"""

from __future__ import annotations

import json
import os

import jax

from diffode_jax import paths
from diffode_jax.errors import WorkdirError


def check_writable(workdir: str) -> None:
  """Raises WorkdirError unless workdir is (or can be created as) a writable directory.

  Changes nothing on disk; ``ensure`` then creates it and really writes.
  """
  paths.check_supported(workdir)
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir!r} is not a directory")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"workdir {workdir!r} is not writable: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir!r} is not writable: {existing!r} is read-only")


def ensure(workdir: str, subdirs=()) -> None:
  """Creates workdir and checks that this process can write a file into it and into each
  of ``subdirs`` that exists (e.g. checkpoints/, which may be read-only on its own)."""
  for directory in [workdir] + [os.path.join(workdir, d) for d in subdirs]:
    if directory != workdir and not os.path.isdir(directory):
      continue
    try:
      os.makedirs(directory, exist_ok=True)
      probe = os.path.join(directory, f".write_test.{jax.process_index()}.{os.getpid()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise WorkdirError(f"{directory!r} is not writable: {e.strerror}") from None


def saved_config(workdir: str):
  """The workdir's finalized config.json, or None if it has none.

  A config.json that is not valid JSON raises WorkdirError (never overwritten: it may be
  the only record of how the checkpoints were made).
  """
  from diffode_jax.config import read_workdir_config
  from diffode_jax.errors import CheckpointError

  if not os.path.exists(paths.config_path(workdir)):
    return None
  try:
    return read_workdir_config(workdir)
  except CheckpointError as e:
    raise WorkdirError(f"{e}; not overwriting it: move it away or use another "
                       f"workdir") from None


def checkpoint_steps(workdir: str) -> list:
  """The committed checkpoint steps (folders named by an integer) in checkpoints/."""
  directory = paths.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def has_checkpoint(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir))


def logged_losses(workdir: str, up_to_step: int) -> dict:
  """step -> logged training loss of metrics.jsonl rows up to ``up_to_step``."""
  return {r["step"]: r["loss"] for r in read_jsonl(paths.metrics_path(workdir))
          if isinstance(r, dict) and "loss" in r and isinstance(r.get("step"), int)
          and r["step"] <= up_to_step}


def write_json(path: str, obj) -> None:
  """Writes atomically (temp file + rename) so a kill never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list:
  """The complete JSON lines of a file (a line cut by a kill, and anything after, dropped)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def write_jsonl(path: str, rows) -> None:
  """Replaces path with rows, one JSON object a line, atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def append_jsonl(path: str, rows) -> None:
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- metrics


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl rows after ``step`` (and a row cut by a kill): a resumed run
  rewrites them, so each step appears once."""
  path = paths.metrics_path(workdir)
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("step", 0) <= step:
        keep.append(row)
  write_jsonl(path, keep)


class MetricsWriter:
  """metrics.jsonl (appended, flushed per row) and TensorBoard scalars."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = paths.metrics_path(workdir)
    self.file = open(self.path, "a")
    self.tb = None
    if tensorboard:
      try:
        from flax.metrics import tensorboard as tb

        self.tb = tb.SummaryWriter(paths.tensorboard_dir(workdir))
      except ImportError:  # tensorboard not installed: metrics.jsonl only
        self.tb = None

  def write(self, row: dict) -> None:
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if self.tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.scalar(k, v, row["step"])
      self.tb.flush()

  def close(self) -> None:
    self.file.close()
    if self.tb:
      self.tb.close()


# ----------------------------------------------------------------------------- per-image rows


class PerImageRows:
  """eval/per_image.jsonl: a header (every field that changes a row) and one row per image.

  ``start(header, num_images, batch_size)`` keeps the rows of an earlier evaluation with
  the same header (a resumed evaluation) and rewrites the file with them: whole batches
  of ``batch_size`` only (batch b's rows depend on the header alone), and the last,
  shorter batch only if the earlier run had the same number of images (its noise has
  the shape of that batch). ``add`` appends a finished batch.
  """

  def __init__(self, workdir: str):
    self.directory = paths.eval_dir(workdir)
    self.path = os.path.join(self.directory, "per_image.jsonl")
    self.rows: list = []

  def start(self, header: dict, num_images: int, batch_size: int) -> int:
    """Returns the index of the first batch still to compute."""
    os.makedirs(self.directory, exist_ok=True)
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
    write_jsonl(self.path, [{"header": header, "num_images": num_images}] + self.rows)

  def add(self, rows: list) -> None:
    append_jsonl(self.path, rows)
    self.rows.extend(rows)
