"""One run per workdir: a lock file held by process 0 for the whole run.

``<workdir>/.train.lock`` for training, ``<workdir>/eval/.lock`` for eval_bpd (training and
evaluating the same workdir at once is fine; two trainings or two evaluations are not).
The file holds the holder's host, pid, mode and start time, and its modification time is
refreshed every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over with a
warning, when its holder runs on this host and that pid is gone, or when it has not been
refreshed for ``STALE_S`` seconds (a holder on another host of a shared disk that died).
Created exclusively (O_EXCL locally, a conditional upload in a gs:// bucket:
``storage.create_exclusive``), so two starting runs cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Literal

from diffode_jax import parallel, storage
from diffode_jax.errors import WorkdirError, warn

HEARTBEAT_S = 10.0
STALE_S = 120.0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Context manager: acquire on enter (WorkdirError if held), release on exit."""

  def __init__(self, path: str, mode: str, enabled: bool = True) -> None:
    self.path = path
    self.mode = mode
    self.enabled = enabled
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._held = False

  def _holder(self) -> Any:
    try:
      return json.loads(storage.read_text(self.path))
    except (OSError, ValueError):
      return None

  def _stale(self, holder: Any) -> bool:
    if holder is None:
      return True
    try:
      age = time.time() - storage.mtime(self.path)
    except OSError:
      return True
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
      return True
    return age > STALE_S

  def acquire(self) -> WorkdirLock:
    if not self.enabled:
      return self
    directory = storage.dirname(self.path) or "."
    self._created = storage.missing_parents(directory)
    storage.makedirs(directory)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "mode": self.mode,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        created = storage.create_exclusive(self.path, json.dumps(me).encode())
      except OSError as e:  # e.g. a bucket that may be read but not written
        raise WorkdirError(f"{directory!r} is not writable: {storage.describe(e)}") from None
      if not created:
        holder = self._holder()
        if not self._stale(holder):
          h = holder or {}
          raise WorkdirError(
              f"{storage.dirname(self.path)} is in use by another {h.get('mode', 'run')} "
              f"(pid {h.get('pid')} on {h.get('host')} since {h.get('since')}; lock file "
              f"{self.path}); wait for it to finish, or delete the lock file if that "
              f"process is gone") from None
        warn(f"taking over the stale lock {self.path} of pid "
             f"{(holder or {}).get('pid')} on {(holder or {}).get('host')}")
        try:
          storage.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      self._held = True
      self._thread = threading.Thread(target=self._beat, daemon=True)
      self._thread.start()
      return self
    raise WorkdirError(f"could not take the lock {self.path}: another run took it first")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        storage.refresh(self.path)
      except OSError:
        return

  def release(self) -> None:
    self._stop.set()
    if self._held:
      self._held = False
      try:
        storage.remove(self.path)
      except OSError:
        pass
    for directory in getattr(self, "_created", []):  # a failed start leaves no new folder
      try:
        storage.rmdir(directory)
      except OSError:
        break

  def keep_directories(self) -> None:
    """The run got going: folders created for the lock stay."""
    self._created = []

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc: object) -> Literal[False]:
    self.release()
    return False


def acquire_on_chief(lock: WorkdirLock) -> None:
  """Process 0 takes the lock (the others' locks are disabled); every process learns
  whether it could, so none is left waiting in a collective when it could not."""
  error = None
  try:
    lock.acquire()
  except WorkdirError as e:
    error = e
  if parallel.on_any_process(error is not None):
    raise error or WorkdirError("the workdir is in use by another run (see process 0)")
