"""Bad input (docs/design.md, The workdir): one line on stderr, exit status 1, the workdir as it
was.

Most cases go through ``cli.dispatch`` in-process (what main.py runs after flag parsing);
flag parsing itself needs main.py in a subprocess. The batch size that does not divide the
device count is in test_multidevice.py (it needs several devices).
"""

import copy
import importlib
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import procs
from diffode_jax import cli, run
from diffode_jax import data as data_lib


def _dispatch(config, workdir, mode, capsys):
  """(exit status, stderr lines) of cli.dispatch, checking that the workdir is unchanged."""
  before = procs.snapshot(workdir)
  status = cli.dispatch(config, str(workdir), mode)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert procs.snapshot(workdir) == before, "the workdir changed"
  return status, lines


def _assert_one_error_line(status, lines, *fragments):
  assert status == 1
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.subprocess
def test_unknown_config_field_on_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  for flag, fragment in [("--config.training.batch_sise=8",
                          "unknown config field 'batch_sise' (did you mean 'batch_size'?)"),
                         ("--config.nonsense=1", "unknown config field 'nonsense'"),
                         ("--config.training.batch_size=many", "batch_size=many")]:
    result = subprocess.run(procs.main_command(workdir, flag), cwd=procs.REPO,
                            env=procs.env(), capture_output=True, text=True, timeout=60)
    _assert_one_error_line(result.returncode, procs.error_lines(result.stderr), fragment)
  assert not workdir.exists()


@pytest.mark.parametrize("section, field, value, fragment", [
    ("data", "dataset", "mnist", "unknown data.dataset 'mnist'"),
    ("training", "dequantization", "gauss", "unknown training.dequantization 'gauss'"),
    ("data", "image_size", 12, "the config expects (12, 12, 1)"),
    ("data", "num_levels", 8, "pixel value 16 does not fit data.num_levels=8"),
])
def test_bad_config_values(tiny_config, tmp_path, capsys, section, field, value, fragment):
  tiny_config[section][field] = value
  status, lines = _dispatch(tiny_config, tmp_path / "run", "train", capsys)
  _assert_one_error_line(status, lines, fragment)


@pytest.mark.parametrize("case, fragment", [
    ("empty", "holds no PNG or JPEG images"),
    ("unreadable", "cannot read image"),
    ("wrong_size", "has shape (16, 16, 1), the config expects (8, 8, 1)"),
    ("wrong_depth", "pixel value 200 does not fit data.num_levels=17"),
])
def test_bad_image_folder(tiny_config, tmp_path, capsys, case, fragment):
  from PIL import Image

  folder = tmp_path / "images" / "train"
  folder.mkdir(parents=True)
  if case == "unreadable":
    (folder / "a.png").write_bytes(b"not an image")
  elif case == "wrong_size":
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
  elif case == "wrong_depth":
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(folder / "a.png")
  tiny_config.data.dataset = "image_folder"
  tiny_config.data.folder = str(tmp_path / "images")
  status, lines = _dispatch(tiny_config, tmp_path / "run", "train", capsys)
  _assert_one_error_line(status, lines, fragment)


@pytest.mark.parametrize("mode", ["train", "eval_bpd", "sample"])
def test_url_workdir_is_refused_not_written_locally(tiny_config, tmp_path, capsys,
                                                    monkeypatch, mode):
  """URLs other than gs:// (which test_storage.py covers) are refused."""
  monkeypatch.chdir(tmp_path)
  status = cli.dispatch(tiny_config, "s3://bucket/run", mode)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  _assert_one_error_line(status, lines, "only local paths and gs:// URLs are supported")
  assert list(tmp_path.iterdir()) == []  # no local 's3:' folder


def test_workdir_not_writable(tiny_config, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  status, lines = _dispatch(tiny_config, blocker / "run", "train", capsys)
  _assert_one_error_line(status, lines, "is not writable", "is a file")
  status, lines = _dispatch(tiny_config, blocker, "train", capsys)
  _assert_one_error_line(status, lines, "is not a directory")


def test_missing_checkpoint(tiny_config, tmp_path, capsys):
  status, lines = _dispatch(tiny_config, tmp_path / "never_trained", "eval_bpd", capsys)
  _assert_one_error_line(status, lines, "no checkpoints in")
  tiny_config.training.init_from = str(tmp_path / "never_trained")
  status, lines = _dispatch(tiny_config, tmp_path / "run", "train", capsys)
  _assert_one_error_line(status, lines, "training.init_from=", "no checkpoints in")


def test_checkpoint_of_another_architecture(tiny_config, tmp_path, capsys):
  workdir = tmp_path / "run"
  tiny_config.training.num_steps = 2
  run.train(tiny_config, str(workdir))
  capsys.readouterr()
  wider = copy.deepcopy(tiny_config)
  wider.model.channels = 16
  for mode in ("eval_bpd", "train"):  # evaluating, or resuming training
    status, lines = _dispatch(wider, workdir, mode, capsys)
    _assert_one_error_line(status, lines, "model.channels=16 contradicts the workdir's "
                           "config.json (8)")
  # Without config.json (checkpoints copied alone) the restore itself names the array.
  os.remove(workdir / "config.json")
  for mode in ("eval_bpd", "train"):
    status, lines = _dispatch(wider, workdir, mode, capsys)
    _assert_one_error_line(status, lines, "does not match the configured model",
                           "has shape")


def _poisoning_train_step(real_make_train_step):
  """make_train_step whose step turns the params to NaN when every pixel of the batch is
  15 or 16 (valid digits levels, but never a whole real batch), and the loss too for 15."""

  def make(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)

    def train_step(state, batch, key):
      new_state, metrics = step_fn(state, batch, key)
      poison = lambda flag: lambda x: jnp.where(flag, jnp.nan, x)
      params = jax.tree.map(poison(jnp.all(batch >= 15)), new_state.params)
      metrics = dict(metrics, loss=poison(jnp.all(batch == 15))(metrics["loss"]))
      return new_state.replace(params=params), metrics

    return train_step

  return make


@pytest.mark.parametrize("bad_step, sentinel, fragment", [
    (3, 15, "non-finite loss at step 3"),  # seen at a log step
    (4, 16, "non-finite parameters at step 4"),  # finite loss, caught before the save
])
def test_nan_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, capsys,
                                                      monkeypatch, bad_step, sentinel,
                                                      fragment):
  real_host_batch = data_lib.host_batch

  def host_batch(data, batch_size, step, *args):
    batch = real_host_batch(data, batch_size, step, *args)
    return np.full_like(batch, sentinel) if step == bad_step - 1 else batch

  train_module = importlib.import_module("diffode_jax.run.train")
  monkeypatch.setattr(train_module, "make_train_step",
                      _poisoning_train_step(train_module.make_train_step))
  monkeypatch.setattr(data_lib, "host_batch", host_batch)
  tiny_config.training.num_steps = 6
  tiny_config.training.checkpoint_every = 2
  workdir = tmp_path / "run"
  status = cli.dispatch(tiny_config, str(workdir), "train")
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert status == 1 and "Traceback" not in "\n".join(lines)
  assert lines[-1].startswith("error: non-finite ") and fragment in lines[-1], lines[-1]
  assert "the last good checkpoint (step 2) is kept" in lines[-1]
  assert procs.checkpoint_steps(workdir) == [2]
  saved = procs.load_checkpoint(workdir)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved))
  logged = [r["step"] for r in procs.read_metrics(workdir)]
  assert logged == list(range(1, bad_step if sentinel == 15 else bad_step + 1))
