"""What the user sees and sends while a loop runs: progress bars, and SIGTERM as a request
to save and stop."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:
  from tqdm import tqdm


def progress(total: int, initial: int, desc: str) -> tqdm:
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

  def __init__(self) -> None:
    self.requested = False
    self._old: dict[signal.Signals, Any] = {}
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      self.restore()
      raise KeyboardInterrupt
    self.requested = True
    if signum == signal.SIGINT:
      print("\nstopping: saving a checkpoint at the next step (Ctrl-C again to stop now)",
            file=sys.stderr)

  def restore(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
