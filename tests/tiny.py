"""The one tiny test config: configs/digits.py shrunk to a few thousand parameters.

``TINY`` holds the field overrides ("section.name" -> value); ``config`` returns the
ConfigDict (digits + TINY + the caller's overrides) and ``flags`` the same overrides as
``--config.<section.name>=value`` flags for main.py. Callers add their own differences
explicitly: conftest's ``tiny_config`` fixture (``FIXTURE``), the subprocess helpers in
procs.py (``procs.SUBPROCESS``) and test_evaluation.py's longer run.

``default_data`` is the base of the data and config tests: configs/default.py's
``config.data`` with some fields set.
"""

from __future__ import annotations

TINY = {
    "model.channels": 8, "model.num_blocks": 1, "model.embed_dim": 16,
    "model.num_groups": 4, "model.dropout": 0.0,
    "training.batch_size": 16, "training.warmup_steps": 1, "training.log_every": 1,
}

# What conftest's tiny_config fixture adds: 3 steps, checkpoints at 2 and 3, a short eval.
FIXTURE = {
    "training.num_steps": 3, "training.checkpoint_every": 2,
    "eval.batch_size": 16, "eval.num_images": 16, "eval.rtol": 1e-3, "eval.atol": 1e-3,
}


def merged(*updates: dict, **fields) -> dict:
  """TINY updated by each dict of updates in turn, then by fields (a__b=value: a.b=value)."""
  out = dict(TINY)
  for update in updates:
    out.update(update)
  out.update({k.replace("__", "."): v for k, v in fields.items()})
  return out


def config(*updates: dict, **fields):
  """The ConfigDict of configs/digits.py with ``merged(*updates, **fields)`` applied."""
  from configs import digits

  c = digits.get_config()
  for path, value in merged(*updates, **fields).items():
    section, name = path.split(".")
    c[section][name] = value
  return c


def flags(*updates: dict, **fields) -> list[str]:
  """``merged(*updates, **fields)`` as --config.<section.name>=value flags."""
  return [f"--config.{k}={v}" for k, v in merged(*updates, **fields).items()]


def default_data(**fields):
  """config.data of configs/default.py (not tiny: the data tests' base) with fields set."""
  from configs import default

  c = default.get_config()
  for key, value in fields.items():
    c.data[key] = value
  return c.data
