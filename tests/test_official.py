"""Import of official i-DODE checkpoints (--mode=import_official, diffode_jax/official.py).

The fixture (tests/fixtures/official_i_dode/vp_cifar_like, see its README) was written by
the official model code itself: importing it and evaluating ``Model.drift`` must give what
the official ``VDM.ode`` returned. Other layouts are checked by writing official-format
files from this project's own networks (``official_names.to_official``), since the importer
must derive every layout from names and shapes alone.
"""

import copy
import json
import os
import subprocess

import flax
import jax
import numpy as np
import pytest
from PIL import Image

import diffode_jax as dj
import procs
from diffode_jax import cli, official, run
from diffode_jax.model import build, count_params
from official_names import layout_of_config, to_official

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "official_i_dode", "vp_cifar_like")
FIXTURE_CKPT = os.path.join(FIXTURE, "checkpoints-0")


def fixture_config(**data_fields):
  """configs/cifar10_velocity.py at the fixture's widths (official_config.json), with
  CPU-sized run settings."""
  from configs import cifar10_velocity

  config = cifar10_velocity.get_config()
  with open(os.path.join(FIXTURE, "official_config.json")) as f:
    o = json.load(f)
  m = config.model
  m.channels, m.num_blocks, m.embed_dim = o["sm_n_embd"], o["sm_n_layer"], 4 * o["sm_n_embd"]
  m.attention, m.block_attention = True, o["with_attention"]
  m.schedule, m.dropout = o["schedule"], 0.0
  config.data.image_size = 8
  for name, value in data_fields.items():
    config.data[name] = value
  t = config.training
  t.batch_size, t.log_every, t.checkpoint_every, t.tensorboard = 4, 1, 1, False
  e = config.eval
  e.batch_size, e.num_images, e.rtol, e.atol = 4, 4, 1e-3, 1e-3
  s = config.sample
  s.num_samples, s.batch_size, s.rtol, s.atol = 2, 2, 1e-3, 1e-3
  return config


def _write_folder(root, n_train=4, n_test=4):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    os.makedirs(os.path.join(root, split))
    for i in range(n):
      image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(image).save(os.path.join(root, split, f"{i}.png"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(config, workdir) of the fixture imported through the command-line dispatch."""
  root = tmp_path_factory.mktemp("official")
  folder = str(root / "images")
  _write_folder(folder)
  config = fixture_config(dataset="image_folder", folder=folder)
  workdir = str(root / "imported")
  assert cli.dispatch(config, workdir, "import_official",
                      official_checkpoint=FIXTURE_CKPT) == 0
  return config, workdir


def _raw_fixture():
  with open(os.path.join(FIXTURE_CKPT, "ckpt-1.flax"), "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


# ----------------------------------------------------------------------------- the fixture


def test_fixture_drift_matches_the_official_code(imported):
  model = dj.load(imported[1])
  expected = np.load(os.path.join(FIXTURE, "expected.npz"))
  assert np.all(expected["conditioning"] == 0)  # Model.drift conditions on zero
  for i, gamma in enumerate(expected["gamma"]):
    want = expected["drift"][i]
    got = model.drift(expected["x"], float(gamma))
    assert got.shape == want.shape and got.dtype == np.float32
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < 1e-5, (float(gamma), rel)  # measured: at most 3.2e-6 (gamma = 4.9)
    # eps_hat too: the network output itself, before the drift's scalar factor
    p, x = model.components.parameterization, expected["x"]
    f = model.components.net_fn(model.params, x, gamma, None, False)
    eps_hat = np.asarray(p.eps_hat(f, x, gamma))
    rel = np.max(np.abs(eps_hat - expected["eps_hat"][i])) / np.max(np.abs(expected["eps_hat"][i]))
    assert rel < 1e-5, (float(gamma), rel)


def test_imported_workdir_holds_the_official_state(imported):
  config, workdir = imported
  raw = _raw_fixture()
  saved = procs.load_checkpoint(workdir)
  assert procs.checkpoint_steps(workdir) == [int(raw["step"])]
  assert int(saved["step"]) == int(raw["step"])
  layout = official.derive_layout(raw["params"]["score_model"], "fixture")
  for key in ("params", "ema_params"):
    back = to_official(saved[key], layout)
    procs.assert_trees_close(back, raw[key]["score_model"], rtol=0, atol=0)
  adam = raw["opt_state"]["0"]
  inner = saved["opt_state"]["inner_opt_state"]
  procs.assert_trees_close(to_official(inner["0"]["mu"], layout),
                           adam["mu"]["score_model"], rtol=0, atol=0)
  procs.assert_trees_close(to_official(inner["0"]["nu"], layout),
                           adam["nu"]["score_model"], rtol=0, atol=0)
  assert int(inner["0"]["count"]) == int(adam["count"])
  assert int(inner["2"]["count"]) == int(raw["step"])  # the learning rate's step

  with open(os.path.join(workdir, "config.json")) as f:
    saved_config = json.load(f)
  assert saved_config["model"]["gamma_min"] == -13.3
  assert saved_config["model"]["gamma_max"] == 5.0
  with open(os.path.join(workdir, "import.json")) as f:
    report = json.load(f)
  assert report["step"] == int(raw["step"]) and "carried over" in report["optimizer"]
  assert report["params"] == count_params(raw["params"]["score_model"])


def _blind_warnings(capsys):
  return [l for l in capsys.readouterr().err.splitlines()
          if l.startswith("warning: model.channels=32 with model.num_groups=32")]


def test_round_trip_eval_sample_and_second_order_fine_tune(imported, tmp_path, capsys):
  """The fixture's network (32 channels in 32 GroupNorm groups, as the official code builds
  it at this width) cannot see the noise level; its layout is fixed by the checkpoint, so
  every mode still works on it, each with one warning line."""
  config, workdir = imported
  capsys.readouterr()
  report = run.evaluate(config, workdir)
  assert report["checkpoint_step"] == int(_raw_fixture()["step"])
  assert report["num_images"] == 4 and np.isfinite(report["bpd"])
  assert len(_blind_warnings(capsys)) == 1
  assert os.path.exists(run.sample(config, workdir))
  assert len(_blind_warnings(capsys)) == 1
  dj.load(workdir)
  assert len(_blind_warnings(capsys)) == 1

  fine = copy.deepcopy(config)
  fine.model.second_order = True
  fine.training.init_from = workdir
  fine.training.init_from_optimizer = True
  fine.training.num_steps = 2
  row = run.train(fine, str(tmp_path / "fine"))
  assert row["step"] == 2 and row["second_order_bpd"] > 0
  assert len(_blind_warnings(capsys)) == 1
  # The learning rate continues past the warm-up (the official schedule's step) instead
  # of restarting from 0, so the very first update moves the params.
  assert row["learning_rate"] == pytest.approx(fine.training.learning_rate)
  first = procs.load_checkpoint(tmp_path / "fine", 1)
  source = procs.load_checkpoint(workdir)
  assert not np.allclose(first["params"]["Conv_0"]["kernel"],
                         source["params"]["Conv_0"]["kernel"])
  inner = procs.load_checkpoint(tmp_path / "fine")["opt_state"]["inner_opt_state"]
  assert int(inner["0"]["count"]) == int(source["opt_state"]["inner_opt_state"]["0"]["count"]) + 2
  assert int(inner["2"]["count"]) == int(source["step"]) + 2

  fine.training.num_steps = 3  # resuming the fine-tune: its checkpoint fixes the layout
  assert run.train(fine, str(tmp_path / "fine"))["step"] == 3
  assert len(_blind_warnings(capsys)) == 1
  assert cli.dispatch(config, str(tmp_path / "again"), "import_official",
                      official_checkpoint=FIXTURE_CKPT) == 0
  assert len(_blind_warnings(capsys)) == 1


# ----------------------------------------------------------------------------- other layouts


def _official_file(path, config, step=7, seed=0):
  """Writes an official-format ckpt-N.flax of random weights for config's network;
  returns the native params and EMA params."""
  components = build(config)
  shapes = jax.eval_shape(components.init_params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  draw = lambda: jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  params, ema, mu, nu = draw(), draw(), draw(), jax.tree.map(np.abs, draw())
  layout = layout_of_config(config)
  wrap = lambda p: {"score_model": to_official(p, layout)}
  state = {"step": np.asarray(step), "params": wrap(params), "ema_params": wrap(ema),
           "opt_state": {"0": {"count": np.asarray(step, np.int32), "mu": wrap(mu),
                               "nu": wrap(nu)}, "1": {}, "2": {}}}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, f"ckpt-{step}.flax"), "wb") as f:
    f.write(flax.serialization.to_bytes(state))
  return params, ema


@pytest.mark.parametrize("fields", [
    # the cifar10_aug layout: attention after every block, augmentation flag input
    {"model.block_attention": True, "data.augment": True, "model.num_blocks": 1},
    # deeper, no middle attention, no Fourier features, one image channel, a biased
    # time projection and no conditioning input: not released, but derivable
    {"model.num_blocks": 3, "model.attention": False, "model.fourier_features": False,
     "data.channels": 1, "model.time_proj": "with_bias", "model.cond_input": "onehot",
     "model.embed_dim": 64},
])
def test_other_layouts_are_derived_from_shapes(tmp_path, fields):
  config = fixture_config()
  for path, value in fields.items():
    section, name = path.split(".")
    config[section][name] = value
  config = official.import_config(config)
  params, ema = _official_file(tmp_path / "checkpoints-0", config)
  workdir = tmp_path / "w"
  run.import_official(config, str(workdir), str(tmp_path / "checkpoints-0"))
  saved = procs.load_checkpoint(workdir)
  assert int(saved["step"]) == 7
  procs.assert_trees_close(saved["params"], params, rtol=0, atol=0)
  procs.assert_trees_close(saved["ema_params"], ema, rtol=0, atol=0)
  with open(workdir / "import.json") as f:
    layout = json.load(f)["layout"]
  m = config.model
  assert layout["num_blocks"] == m.num_blocks and layout["mid_attention"] == m.attention
  assert layout["block_attention"] == m.block_attention
  assert layout["image_channels"] == config.data.channels


# ----------------------------------------------------------------------------- bad input


def _import_fails(config, workdir, path, capsys, *fragments):
  before = procs.snapshot(workdir)
  status = cli.dispatch(config, str(workdir), "import_official",
                        official_checkpoint=path)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert status == 1
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  assert procs.snapshot(workdir) == before, "the workdir changed"


def test_bad_official_checkpoints(tmp_path, capsys):
  config = fixture_config()
  workdir = tmp_path / "w"
  empty = tmp_path / "empty"
  empty.mkdir()
  _import_fails(config, workdir, str(empty), capsys, "holds no ckpt-*.flax file")
  _import_fails(config, workdir, str(tmp_path / "nowhere"), capsys, "does not exist")
  with open(os.path.join(FIXTURE_CKPT, "ckpt-1.flax"), "rb") as f:
    data = f.read()
  truncated = tmp_path / "cut" / "ckpt-1.flax"
  truncated.parent.mkdir()
  truncated.write_bytes(data[:len(data) // 2])
  _import_fails(config, workdir, str(truncated.parent), capsys,
                "is not a readable official checkpoint")
  foreign = tmp_path / "foreign" / "ckpt-3.flax"
  foreign.parent.mkdir()
  foreign.write_bytes(flax.serialization.to_bytes({"step": 3, "params": {"w": np.ones(2)}}))
  _import_fails(config, workdir, str(foreign), capsys,
                "is not an official i-DODE checkpoint")
  _import_fails(config, workdir, "", capsys, "needs --official_checkpoint=PATH")
  assert not workdir.exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("model.channels", 64, "model.channels=64 in the config but 32 in the checkpoint"),
    ("model.num_blocks", 3, "model.num_blocks=3 in the config but 2 in the checkpoint"),
    ("model.block_attention", True, "model.block_attention=True in the config but False"),
    ("model.time_proj", "with_bias", "model.time_proj='with_bias' in the config but 'zero_no_bias'"),
    ("data.channels", 1, "data.channels=1 in the config but 3 in the checkpoint"),
])
def test_config_mismatch_names_the_field(tmp_path, capsys, field, value, fragment):
  config = fixture_config()
  section, name = field.split(".")
  config[section][name] = value
  _import_fails(config, tmp_path / "w", FIXTURE_CKPT, capsys, fragment)
  assert not (tmp_path / "w").exists()


def test_import_never_overwrites_checkpoints(imported, capsys):
  config, workdir = imported
  _import_fails(config, workdir, FIXTURE_CKPT, capsys, "already holds checkpoints")


def test_an_import_killed_during_its_save_can_be_rerun(imported, tmp_path, capsys):
  """A kill during the save leaves only orbax's temporary folder of the step: no committed
  checkpoint, so the rerun imports (and removes the leftover) instead of refusing."""
  config, _ = imported
  workdir = tmp_path / "killed"
  leftover = workdir / "checkpoints" / "1.orbax-checkpoint-tmp-1733400000"
  leftover.mkdir(parents=True)
  (leftover / "partial").write_bytes(b"\0" * 64)
  assert cli.dispatch(config, str(workdir), "import_official",
                      official_checkpoint=FIXTURE_CKPT) == 0, capsys.readouterr().err
  assert os.listdir(workdir / "checkpoints") == [str(int(_raw_fixture()["step"]))]


def test_command_line_import_mismatch(tmp_path):
  """main.py's flags reach the importer; a width mismatch is one line, exit 1."""
  workdir = tmp_path / "w"
  flags = [f"--official_checkpoint={FIXTURE_CKPT}", "--config.model.channels=64",
           "--config.model.num_blocks=2", "--config.model.embed_dim=128",
           "--config.data.image_size=8"]
  result = subprocess.run(
      procs.main_command(workdir, *flags, mode="import_official",
                         config="configs/cifar10_velocity.py"),
      cwd=procs.REPO, env=procs.env(), capture_output=True, text=True, timeout=120)
  lines = procs.error_lines(result.stderr)
  assert result.returncode == 1, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert "model.channels=64 in the config but 32 in the checkpoint" in lines[0]
  assert not workdir.exists()
