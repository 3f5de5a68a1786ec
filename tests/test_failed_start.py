"""A run that fails or is stopped before it saves anything leaves the workdir as it was;
a SIGTERM during start-up is one line, exit 0 and no lock left behind."""

from __future__ import annotations

import importlib
import os
import signal

import pytest

import procs
import tiny
from diffode_jax import cli, run
from diffode_jax.errors import TrainingError

TRAIN = importlib.import_module("diffode_jax.run.train")  # the module, not run.train


def _config(**fields):
  return tiny.config(tiny.FIXTURE, {"training.num_steps": 4, "training.checkpoint_every": 2,
                                    "training.log_every": 1}, **fields)


def _tree(root):
  out = {}
  for here, _, files in os.walk(root):
    for name in files:
      path = os.path.join(here, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _fail_at_first_log(monkeypatch):
  def check_row(row, step, last_saved, guard):
    raise TrainingError(f"diverged at step {step} (forced by the test)")

  monkeypatch.setattr(TRAIN, "_check_row", check_row)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_trace(tmp_path, monkeypatch,
                                                                      capsys):
  _fail_at_first_log(monkeypatch)
  workdir = tmp_path / "new"
  assert cli.dispatch(_config(), str(workdir), "train") == 1
  assert "diverged at step 1" in capsys.readouterr().err
  assert not workdir.exists()  # no config.json, checkpoints/, metrics.jsonl, tensorboard/

  # A workdir that existed with a file of the user's keeps exactly that.
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  assert cli.dispatch(_config(), str(workdir), "train") == 1
  assert sorted(os.listdir(workdir)) == ["notes.txt"]


def test_a_resumed_run_that_fails_keeps_everything_it_had(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "run")
  run.train(_config(), workdir)
  before = _tree(workdir)
  _fail_at_first_log(monkeypatch)
  assert cli.dispatch(_config(**{"training.num_steps": 6}), workdir, "train") == 1
  after = _tree(workdir)
  # Its files are all still there; metrics.jsonl is the one rewritten (to the restored step).
  assert set(before) <= set(after)
  assert {k for k in before if before[k] != after[k]} <= {"metrics.jsonl"}


def test_a_failure_after_the_first_checkpoint_keeps_the_run(tmp_path, monkeypatch, capsys):
  real = TRAIN._check_row

  def check_row(row, step, last_saved, guard):
    if step == 3:
      raise TrainingError("diverged at step 3 (forced by the test)")
    return real(row, step, last_saved, guard)

  monkeypatch.setattr(TRAIN, "_check_row", check_row)
  workdir = tmp_path / "run"
  assert cli.dispatch(_config(), str(workdir), "train") == 1
  assert os.listdir(workdir / "checkpoints") == ["2"]
  assert (workdir / "config.json").exists() and (workdir / "metrics.jsonl").exists()


@pytest.mark.subprocess
def test_sigterm_during_start_up_is_one_line_exit_0_and_no_lock(tmp_path):
  workdir = tmp_path / "run"
  proc = procs.start(workdir, *procs.overrides(training__num_steps=50))
  lock = workdir / ".train.lock"
  procs.wait_for(lock.exists, proc, what="the training lock")  # the handler is installed
  proc.send_signal(signal.SIGTERM)
  _, stderr = procs.finish(proc)
  assert proc.returncode == 0, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("stopped by signal")]
  assert len(lines) == 1, stderr[-2000:]
  assert not lock.exists()
  if "before the first step" in lines[0]:  # nothing trained: nothing left
    assert not workdir.exists() or os.listdir(workdir) == [], os.listdir(workdir)
  else:  # the signal came after a step: that step was saved
    assert os.listdir(workdir / "checkpoints")
