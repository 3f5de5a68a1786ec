"""What the user sees and sends while a loop runs: progress bars, and SIGTERM as a request
to save and stop."""

from __future__ import annotations

import signal
import sys

import jax


def progress(total: int, initial: int, desc: str):
  """A tqdm bar on stderr, shown by process 0 only."""
  from tqdm import tqdm  # a dependency of tensorflow-datasets; progress bars only

  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
              disable=jax.process_index() != 0, file=sys.stderr)


class StopSignal:
  """Turns SIGTERM into a request to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._old = None
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
