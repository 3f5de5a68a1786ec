"""One run per workdir: a lock file held by process 0 for the whole run.

``<workdir>/.train.lock`` for training, ``<workdir>/eval/.lock`` for eval_bpd (training and
evaluating the same workdir at once is fine; two trainings or two evaluations are not).
The file holds the holder's host, pid, mode and start time, and its modification time is
refreshed every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over with a
warning, when its holder runs on this host and that pid is gone, or when it has not been
refreshed for ``STALE_S`` seconds (a holder on another host of a shared disk that died).
Created with O_EXCL, so two starting runs cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from diffode_jax.errors import WorkdirError

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


def _missing_parents(directory: str) -> list:
  """The folders makedirs(directory) would create, deepest first."""
  out, path = [], os.path.abspath(directory)
  while not os.path.exists(path):
    out.append(path)
    path = os.path.dirname(path)
  return out


class WorkdirLock:
  """Context manager: acquire on enter (WorkdirError if held), release on exit."""

  def __init__(self, path: str, mode: str, enabled: bool = True):
    self.path = path
    self.mode = mode
    self.enabled = enabled
    self._stop = threading.Event()
    self._thread = None
    self._held = False

  def _holder(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _stale(self, holder) -> bool:
    if holder is None:
      return True
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return True
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
      return True
    return age > STALE_S

  def acquire(self):
    if not self.enabled:
      return self
    directory = os.path.dirname(self.path) or "."
    self._created = [] if os.path.isdir(directory) else _missing_parents(directory)
    os.makedirs(directory, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "mode": self.mode,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if not self._stale(holder):
          h = holder or {}
          raise WorkdirError(
              f"{os.path.dirname(self.path)} is in use by another {h.get('mode', 'run')} "
              f"(pid {h.get('pid')} on {h.get('host')} since {h.get('since')}; lock file "
              f"{self.path}); wait for it to finish, or delete the lock file if that "
              f"process is gone") from None
        print(f"warning: taking over the stale lock {self.path} of pid "
              f"{(holder or {}).get('pid')} on {(holder or {}).get('host')}", file=sys.stderr)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._held = True
      self._thread = threading.Thread(target=self._beat, daemon=True)
      self._thread.start()
      return self
    raise WorkdirError(f"could not take the lock {self.path}: another run took it first")

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        return

  def release(self):
    self._stop.set()
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except OSError:
        pass
    for directory in getattr(self, "_created", []):  # a failed start leaves no new folder
      try:
        os.rmdir(directory)
      except OSError:
        break

  def keep_directories(self):
    """The run got going: folders created for the lock stay."""
    self._created = []

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
