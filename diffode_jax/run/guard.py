"""The divergence guard: stop training when the loss leaves its running level.

Rule (``training.divergence_factor`` = f, 0 turns it off): a logged loss that is not
finite, or that exceeds f times the median of the last ``WINDOW`` logged losses (once at
least ``MIN_HISTORY`` are known), stops the run before anything more is saved. The
history includes the rows of metrics.jsonl up to a resumed step, so a run resumed with a
learning rate that blows up is caught at its first logged step. Losses here are bits/dim
of the trained objective (positive), so a factor of 10 is far above the noise of a
healthy run (whose logged loss falls, or moves by a few percent) and far below a
divergence (the loss grows by orders of magnitude within tens of steps).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

import numpy as np

WINDOW = 20
MIN_HISTORY = 3


class DivergenceGuard:

  def __init__(self, factor: float, history: Iterable[object] = ()) -> None:
    self.factor = float(factor)
    self.recent = collections.deque(
        (float(v) for v in history if isinstance(v, (int, float)) and math.isfinite(v)),
        maxlen=WINDOW)

  def level(self) -> float | None:
    """The running level (median of the window), or None before MIN_HISTORY losses."""
    return float(np.median(self.recent)) if len(self.recent) >= MIN_HISTORY else None

  def check(self, loss: float) -> str | None:
    """None if loss is fine (and then it joins the history), else why it is not."""
    if not math.isfinite(loss):
      return f"loss {loss}"
    level = self.level()
    if self.factor > 0 and level is not None and loss > self.factor * level:
      return (f"loss {loss:.4g} bits/dim is more than training.divergence_factor="
              f"{self.factor:g} times its running level {level:.4g} (median of the last "
              f"{len(self.recent)} logged)")
    self.recent.append(float(loss))
    return None
