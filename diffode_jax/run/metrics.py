"""metrics.jsonl and its TensorBoard copy: the rows a training run logs, written as it
goes (``MetricsWriter``), cut back to a restored step on resume (``truncate_metrics``) and
read back (``logged_losses``). A row cut by a kill, and anything after it, is dropped by
the one JSON-lines reader, ``storage.read_jsonl``.
"""

from __future__ import annotations

import time

from diffode_jax import paths, storage
from diffode_jax.run.tensorboard import EventFile

# In a bucket every flush of metrics.jsonl and of the TensorBoard events rewrites the whole
# object, so they are flushed at most this often, and always before a checkpoint is saved
# (a resumed run drops the rows after its checkpoint anyway) and at the end.
REMOTE_FLUSH_SECONDS = 30.0


def logged_losses(workdir: str, up_to_step: int) -> dict[int, float]:
  """step -> logged training loss of metrics.jsonl rows up to ``up_to_step``."""
  return {r["step"]: r["loss"] for r in storage.read_jsonl(paths.metrics_path(workdir))
          if isinstance(r, dict) and "loss" in r and isinstance(r.get("step"), int)
          and r["step"] <= up_to_step}


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl rows after ``step`` (and a row cut by a kill): a resumed run
  rewrites them, so each step appears once."""
  path = paths.metrics_path(workdir)
  if not storage.exists(path):
    return
  keep = [row for row in storage.read_jsonl(path)
          if isinstance(row, dict) and row.get("step", 0) <= step]
  storage.write_jsonl(path, keep)


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

  def write(self, row: dict[str, float | int]) -> None:
    self.rows.add([row])
    if self.tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.scalar(k, v, int(row["step"]))
    if not self.remote or time.monotonic() - self._last_flush >= REMOTE_FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    self.rows.flush()
    if self.tb:
      self.tb.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()
