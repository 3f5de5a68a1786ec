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
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request to save and stop after the step in
  progress (with several processes at the next log step: docs/guarantees.md).

  A second Ctrl-C stops at once (KeyboardInterrupt), without saving.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._old = {}
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      self.restore()
      raise KeyboardInterrupt
    self.requested = True
    if signum == signal.SIGINT:
      print("\nstopping: saving a checkpoint at the next step (Ctrl-C again to stop now)",
            file=sys.stderr)

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
