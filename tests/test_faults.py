"""Faults and guarantees (README "Faults and guarantees"): no stale or wrong report, no lost
good checkpoint, no hang, one run per workdir, and every bad value one line.

In-process through ``cli.dispatch`` where that is faithful; kills, signals, locks held by
other processes and an unwritable checkpoints/ folder in subprocesses.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import procs
import tiny
from diffode_jax import cli, run
from diffode_jax.checkpoint import Checkpointer
from diffode_jax.config import finalize_config, reconcile_with_workdir
from diffode_jax.errors import ConfigError, WorkdirError
from diffode_jax.run.guard import DivergenceGuard
from diffode_jax.run.lock import WorkdirLock


def _config(**fields):
  return tiny.config(tiny.FIXTURE, {"training.num_steps": 4, "training.checkpoint_every": 2,
                                    "training.tensorboard": False}, **fields)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
  """A tiny digits run of 4 steps with checkpoints at 2 and 4 (copy it before changing)."""
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  run.train(_config(), workdir)
  return workdir


@pytest.fixture
def workdir(trained_dir, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(trained_dir, target)
  return target


def _dispatch(config, workdir, mode, capsys, command_line_fields=None):
  status = cli.dispatch(config, str(workdir), mode, command_line_fields)
  captured = capsys.readouterr()
  lines = [l for l in captured.err.splitlines() if l.strip()]
  return status, lines, captured.out


def _one_error(status, lines, *fragments):
  errors = [l for l in lines if l.startswith("error: ")]
  assert status == 1 and len(errors) == 1, lines
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])


def _read(path):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- 1. stale rows


def test_eval_override_of_a_model_field_is_one_line_and_nothing_is_reused(workdir, capsys):
  """The issue's case: evaluate, then again with model.gamma_min=-5.0 on the command line."""
  assert _dispatch(_config(), workdir, "eval_bpd", capsys)[0] == 0
  first = _read(os.path.join(workdir, "eval", "bpd.json"))
  assert first["schedule"] == "VP" and first["parameterization"] == "velocity"
  config = _config()
  config.model.gamma_min = -5.0
  status, lines, _ = _dispatch(config, workdir, "eval_bpd", capsys, {"model.gamma_min"})
  _one_error(status, lines, "model.gamma_min=-5.0", "contradicts the workdir's config.json")
  config = _config()
  config.model.schedule = "SP"
  status, lines, _ = _dispatch(config, workdir, "eval_bpd", capsys, {"model.schedule"})
  _one_error(status, lines, "model.schedule='SP'", "config.json ('VP')")
  assert _read(os.path.join(workdir, "eval", "bpd.json")) == first


def test_fields_not_on_the_command_line_come_from_the_workdir(workdir, capsys):
  """A config file with another network (not set on the command line): the workdir's
  config.json defines the model, so the evaluation runs on the trained one."""
  other = _config()
  other.model.channels = 32
  other.model.schedule = "SP"
  status, _, _ = _dispatch(other, workdir, "eval_bpd", capsys, command_line_fields=set())
  assert status == 0
  report = _read(os.path.join(workdir, "eval", "bpd.json"))
  assert report["schedule"] == "VP"


def test_fewer_images_on_resume_report_the_images_asked_for(workdir, capsys):
  config = _config()
  config.eval.num_images = 8
  config.eval.batch_size = 4
  assert _dispatch(config, workdir, "eval_bpd", capsys)[0] == 0
  eight = _read(os.path.join(workdir, "eval", "bpd.json"))
  config.eval.num_images = 4
  assert _dispatch(config, workdir, "eval_bpd", capsys)[0] == 0
  four = _read(os.path.join(workdir, "eval", "bpd.json"))
  assert eight["num_images"] == 8 and four["num_images"] == 4
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval", "per_image.jsonl"))][1:]
  assert four["bpd"] == pytest.approx(np.mean([r["bpd"] for r in rows[:4]]), rel=1e-12)
  # Another dequantization is another header: nothing of the tn rows is reused.
  config.eval.dequantization = "u"
  assert _dispatch(config, workdir, "eval_bpd", capsys)[0] == 0
  u = _read(os.path.join(workdir, "eval", "bpd.json"))
  assert u["dequantization"] == "u" and u["bpd"] != pytest.approx(four["bpd"], rel=1e-6)


def test_resume_with_another_schedule_is_refused_and_config_json_kept(workdir, capsys):
  before = open(os.path.join(workdir, "config.json")).read()
  config = _config()
  config.model.schedule = "SP"
  config.training.num_steps = 6
  status, lines, _ = _dispatch(config, workdir, "train", capsys, {"model.schedule"})
  _one_error(status, lines, "model.schedule", "resumed training run")
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_reconcile_rules():
  saved = finalize_config(_config())
  config = _config()
  config.data.holdout_fraction = 0.25
  with pytest.raises(ConfigError, match="data.holdout_fraction=0.25"):
    reconcile_with_workdir(finalize_config(config), saved, {"data.holdout_fraction"})
  taken = reconcile_with_workdir(finalize_config(config), saved, set())
  assert taken.data.holdout_fraction == 0.0
  config = _config()
  config.eval.dequantization = "u"  # evaluation settings are free to change
  assert reconcile_with_workdir(finalize_config(config), saved,
                                {"eval.dequantization"}).eval.dequantization == "u"
  config = _config()
  config.training.learning_rate = 1e-4  # so is the optimizer on resume
  assert reconcile_with_workdir(finalize_config(config), saved, None,
                                resume=True).training.learning_rate == 1e-4
  config.training.batch_size = 32  # the data order is not
  with pytest.raises(ConfigError, match="training.batch_size=32"):
    reconcile_with_workdir(finalize_config(config), saved, None, resume=True)


# ----------------------------------------------------------------------------- 2. divergence


def test_guard_rule():
  guard = DivergenceGuard(10.0)
  for loss in (8.0, 6.0, 5.0):  # falling: fine, and it builds the history
    assert guard.check(loss) is None
  assert guard.level() == 6.0
  assert guard.check(59.0) is None  # below 10 x 6
  assert "running level" in guard.check(1e11)
  assert guard.check(float("nan")) == "loss nan"
  assert DivergenceGuard(0.0, [1.0, 1.0, 1.0]).check(1e11) is None  # off
  assert DivergenceGuard(10.0, [1.0, 1.0]).check(1e3) is None  # too little history yet


def test_finite_divergence_is_caught_and_good_checkpoints_survive(workdir, capsys):
  """The issue's case: resume with learning_rate=1e3; the loss explodes but stays finite."""
  config = _config()
  config.training.learning_rate = 1e3
  config.training.num_steps = 40
  config.training.keep_checkpoints = 1
  status, lines, _ = _dispatch(config, workdir, "train", capsys, {"training.learning_rate"})
  _one_error(status, lines, "diverged at step", "divergence_factor=10",
             "the last good checkpoint (step 4) is kept")
  assert procs.checkpoint_steps(workdir) == [2, 4]  # nothing diverged was saved or rotated


def test_retention_keeps_the_lowest_loss_checkpoint_across_restarts(tmp_path):
  directory = str(tmp_path / "checkpoints")
  state = lambda v: {"w": np.full((2,), v, np.float32)}
  ckpt = Checkpointer(directory, keep=2)
  for step, loss in [(1, 5.0), (2, 1.0), (3, 3.0), (4, 9.0), (5, 8.0)]:
    ckpt.save(step, state(step), loss=loss)
  assert ckpt.all_steps() == [2, 4, 5]
  ckpt.close()
  again = Checkpointer(directory, keep=2, losses={2: 1.0, 4: 9.0, 5: 8.0})
  again.save(6, state(6), loss=7.0)
  assert again.all_steps() == [2, 5, 6]
  again.close()


# ----------------------------------------------------------------------------- 4. damage


def _truncate(step_dir, part):
  """Cuts in half every array data file ("data": under ocdbt.process_*/d/; which of them
  holds the EMA params depends on the layout) or the pytree metadata ("metadata")."""
  files = [os.path.join(d, n) for d, _, names in os.walk(step_dir) for n in names]
  if part == "data":
    files = [p for p in files if "ocdbt.process_" in p and os.sep + "d" + os.sep in p]
  else:
    files = [p for p in files if os.path.basename(p) == "_METADATA"]
  assert files
  for target in files:
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)


@pytest.mark.parametrize("part", ["data", "metadata"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(workdir, capsys, part):
  _truncate(os.path.join(workdir, "checkpoints", "4"), part)
  status, lines, _ = _dispatch(_config(), workdir, "eval_bpd", capsys)
  assert status == 0, lines
  assert any("step 4 is damaged" in l for l in lines), lines
  report = _read(os.path.join(workdir, "eval", "bpd.json"))
  assert report["checkpoint_step"] == 2 and report["damaged_checkpoints"] == [4]
  # An evaluation only reads: the workdir's owner (training) moves damaged steps aside.
  assert any("left in place" in l for l in lines), lines
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "4.damaged"))
  # Training resumes from the intact step 2, keeps step 4 aside and writes a new step 4.
  status, lines, _ = _dispatch(_config(), workdir, "train", capsys)
  assert status == 0 and any("moved to" in l and "4.damaged" in l for l in lines), lines
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.damaged"))
  assert procs.checkpoint_steps(workdir) == [2, 4]


def test_shape_mismatch_is_not_called_damage(workdir, capsys):
  config = _config()
  config.model.channels = 16
  status, lines, _ = _dispatch(config, workdir, "train", capsys, set())  # taken from config.json
  assert status == 0  # the workdir's network is used, not the file's
  status, lines, _ = _dispatch(config, workdir, "eval_bpd", capsys, None)
  _one_error(status, lines, "model.channels=16", "contradicts")


# ----------------------------------------------------------------------------- 5. locks


def test_lock_of_a_live_process_refuses_and_a_dead_ones_is_taken_over(workdir, capsys):
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    path = os.path.join(workdir, ".train.lock")
    with open(path, "w") as f:
      json.dump({"host": os.uname().nodename, "pid": sleeper.pid, "mode": "train",
                 "since": "earlier"}, f)
    config = _config()
    config.training.num_steps = 6
    before = procs.checkpoint_steps(workdir)
    status, lines, _ = _dispatch(config, workdir, "train", capsys)
    _one_error(status, lines, "in use by another train", f"pid {sleeper.pid}", path)
    assert procs.checkpoint_steps(workdir) == before and os.path.exists(path)
  finally:
    sleeper.kill()
    sleeper.wait()
  status, lines, _ = _dispatch(config, workdir, "train", capsys)  # the pid is gone now
  assert status == 0 and any("stale lock" in l for l in lines), lines
  assert not os.path.exists(path) and procs.checkpoint_steps(workdir)[-1] == 6


def test_eval_lock(workdir):
  with WorkdirLock(os.path.join(workdir, "eval", ".lock"), "eval_bpd"):
    with pytest.raises(WorkdirError, match="in use by another eval_bpd"):
      run.evaluate(_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, "eval", ".lock"))


@pytest.mark.subprocess
def test_second_run_exits_at_once_and_ctrl_c_saves_and_stops(tmp_path):
  """A running training holds the workdir: a second one exits with one line naming it;
  Ctrl-C (SIGINT) on the first saves a checkpoint at the next step and stops cleanly."""
  workdir = tmp_path / "run"
  flags = procs.overrides(training__num_steps=100000, training__checkpoint_every=100000,
                          training__log_every=1)
  first = procs.start(workdir, *flags)
  try:
    deadline = time.time() + 240
    while not (os.path.exists(workdir / "metrics.jsonl") and procs.read_metrics(workdir)):
      assert first.poll() is None and time.time() < deadline, procs.finish(first)
      time.sleep(0.5)
    second = procs.run(workdir, *flags, timeout=120)
    assert second.returncode == 1
    lines = procs.error_lines(second.stderr)
    assert len(lines) == 1 and "in use by another train" in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0]
    first.send_signal(signal.SIGINT)
    out, err = procs.finish(first, timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, err
  assert "stopped by signal" in err
  steps = procs.checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= procs.read_metrics(workdir)[-1]["step"] - 1
  assert not os.path.exists(workdir / ".train.lock")


# ----------------------------------------------------------------------------- 3. disk


def _chattr(path, flag):
  return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.subprocess
def test_unwritable_checkpoints_fail_fast_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  flags = procs.overrides(training__num_steps=100000, training__checkpoint_every=20,
                          training__log_every=10)
  proc = procs.start(workdir, *flags)
  ckdir = workdir / "checkpoints"
  try:
    deadline = time.time() + 240
    while not procs.checkpoint_steps(workdir):
      assert proc.poll() is None and time.time() < deadline, procs.finish(proc)
      time.sleep(0.2)
    if not _chattr(ckdir, "+i"):
      proc.kill()
      pytest.skip("chattr +i is not available here (needs root on ext4/xfs)")
    out, err = procs.finish(proc, timeout=120)  # must not hang
  finally:
    if proc.poll() is None:
      proc.kill()
    _chattr(ckdir, "-i")
  lines = [l for l in procs.error_lines(err) if not l.startswith("train:")]  # progress bar
  assert proc.returncode == 1 and len(lines) == 1, err
  assert "cannot write checkpoint step" in lines[0] and str(ckdir) in lines[0]
  assert "Operation not permitted" in lines[0] and "Traceback" not in err
  # The previous checkpoint is intact: the start-up check now refuses the same folder.
  kept = procs.checkpoint_steps(workdir)
  procs.load_checkpoint(workdir, kept[-1])
  assert _chattr(ckdir, "+i")
  try:
    again = procs.run(workdir, *flags, timeout=120)
  finally:
    _chattr(ckdir, "-i")
  assert again.returncode == 1 and "checkpoints' is not writable" in again.stderr


# ----------------------------------------------------------------------------- 7. values


@pytest.mark.parametrize("section, field, value, fragment", [
    ("eval", "batch_size", 0, "eval.batch_size must be an integer >= 1"),
    ("sample", "batch_size", 0, "sample.batch_size must be an integer >= 1"),
    ("sample", "num_samples", 0, "sample.num_samples must be an integer >= 1"),
    ("model", "channels", 0, "model.channels must be an integer >= 1"),
    ("eval", "num_images", 0, "eval.num_images must be an integer >= 1"),
    ("eval", "num_images", -3, "eval.num_images must be an integer >= 1"),
    ("eval", "rtol", -1e-5, "eval.rtol must be a number in (0, 0.1]"),
    ("sample", "atol", 0.0, "sample.atol must be a number > 0"),
    ("training", "divergence_factor", -1.0, "divergence_factor must be 0 (off) or a number > 1"),
])
def test_bad_values_are_one_line(tmp_path, capsys, section, field, value, fragment):
  config = _config()
  config[section][field] = value
  for mode in ("train", "eval_bpd", "sample"):
    status, lines, _ = _dispatch(config, tmp_path / "w", mode, capsys)
    _one_error(status, lines, fragment)
  assert not (tmp_path / "w").exists()


def test_num_steps_below_the_checkpoint_and_already_done(workdir, capsys):
  config = _config()
  config.training.num_steps = 2
  status, lines, _ = _dispatch(config, workdir, "train", capsys)
  _one_error(status, lines, "training.num_steps=2 is below", "(4 updates)")
  config.training.num_steps = 4
  status, _, out = _dispatch(config, workdir, "train", capsys)
  assert status == 0 and "nothing to train" in out


def test_garbage_config_json_is_not_overwritten(workdir, capsys):
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write("{ not json")
  for mode in ("train", "eval_bpd"):
    status, lines, _ = _dispatch(_config(), workdir, mode, capsys)
    _one_error(status, lines, "not a valid config.json")
  assert open(path).read() == "{ not json"


def test_tilde_workdir_is_the_home_folder(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  config = _config()
  config.training.num_steps = 1
  assert _dispatch(config, "~/tilde_run", "train", capsys)[0] == 0
  assert (tmp_path / "tilde_run" / "checkpoints").is_dir()
  assert not (tmp_path / "~").exists()
