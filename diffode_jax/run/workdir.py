"""The start-up checks of a workdir (writable, its config.json), atomic JSON, and the
removal of what a failed start created. Where the files are: ``diffode_jax.paths``; how
they are stored, local or gs://: ``diffode_jax.storage``. The files written while a run
goes on have modules of their own: ``run/metrics.py`` (metrics.jsonl and TensorBoard,
``run/tensorboard.py``) and ``run/eval_rows.py`` (eval/: named evaluations, per-image
rows).

Nothing here is half-written by a kill: JSON files are replaced atomically, JSON-lines
files are read back up to their last complete line (in a bucket, where objects cannot be
appended, they are rewritten whole at each flush: ``storage.JsonLines``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections

from diffode_jax import paths, storage
from diffode_jax.errors import WorkdirError



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


def ensure(workdir: str, subdirs: Iterable[str] = ()) -> None:
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

  def __init__(self, workdir: str, entries: Iterable[str], restore: Iterable[str] = ()):
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


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
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


def write_json(path: str, obj: Any) -> None:
  """Writes atomically (temp file + rename, or one object write) so a kill never leaves
  half a file."""
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True))
