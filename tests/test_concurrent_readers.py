"""Readers beside a training run: they never hurt it, and they never call rotation damage.

A training subprocess saves a checkpoint every step and keeps only one, so each step is
deleted right after the next is written; this process loads the workdir in a loop the
whole time (``dj.load``: list the steps, read the newest). Only the trainer, which owns the
workdir, may delete or move a step: the training must finish with exit 0 and no step
moved aside, and every load must either return a model or, before the first checkpoint,
say there is none.
"""

import os

import pytest

import diffode_jax as dj
import procs
from diffode_jax.errors import CheckpointError

STEPS = 40


@pytest.mark.subprocess
def test_a_reader_looping_beside_a_training_run_that_rotates_every_step(tmp_path):
  workdir = tmp_path / "run"
  trainer = procs.start(workdir, *procs.overrides(
      training__num_steps=STEPS, training__checkpoint_every=1,
      training__keep_checkpoints=1, training__log_every=1))
  loaded, not_yet, failures = [], 0, []
  try:
    while trainer.poll() is None:
      try:
        model = dj.load(str(workdir))
        loaded.append(model.step)
      except CheckpointError as e:  # before the first save: nothing to load yet
        if loaded or not str(e).startswith(("no checkpoint", "no checkpoints", "no config")):
          failures.append(str(e))
        not_yet += 1
      except Exception as e:  # anything else is the bug this test is for
        failures.append(f"{type(e).__name__}: {e}")
  finally:
    _, stderr = procs.finish(trainer)
  procs.check_ok(trainer.returncode, stderr)
  assert not failures, failures[:3]
  names = os.listdir(workdir / "checkpoints")
  assert not [n for n in names if "damaged" in n], names
  # The newest step, and the one with the lowest loss if that is another (retention).
  assert str(STEPS) in names and len(names) <= 2, names
  assert len(loaded) >= 3, (loaded, not_yet)  # the loop overlapped the rotation
  assert loaded == sorted(loaded)

