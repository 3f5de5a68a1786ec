"""Evaluation, sampling and the Python API on one briefly trained tiny digits checkpoint."""

import io
import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

import diffode_jax as dj
import procs
import tiny
from diffode_jax import cli, data, run
from diffode_jax.checkpoint import CheckpointError
from diffode_jax.errors import ConfigError
from diffode_jax.keys import eval_key

TRAIN_STEPS = 400
FIRST_CHECKPOINT = 200


def _tiny():
  """tiny.TINY for a longer run (module scope cannot use the function-scoped tiny_config)."""
  return tiny.config({
      "training.num_steps": TRAIN_STEPS, "training.log_every": 100,
      "training.warmup_steps": 10, "training.checkpoint_every": FIRST_CHECKPOINT,
      "training.ema_decay": 0.9,  # the EMA params are what evaluation restores
      "eval.batch_size": 16, "eval.num_images": 48, "eval.rtol": 1e-3, "eval.atol": 1e-3,
      "sample.num_samples": 6, "sample.batch_size": 4, "sample.rtol": 1e-3,
      "sample.atol": 1e-3,
  })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir) after a short training run (two checkpoints)."""
  config = _tiny()
  workdir = str(tmp_path_factory.mktemp("trained"))
  run.train(config, workdir)
  return config, workdir


@pytest.fixture(scope="module")
def loaded(trained):
  return dj.load(trained[1])


def _rows(workdir):
  with open(os.path.join(workdir, "eval", "per_image.jsonl")) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  return lines[0]["header"], lines[1:]


def test_load_restores_config_and_latest_checkpoint(trained, loaded):
  config, workdir = trained
  assert loaded.step == TRAIN_STEPS
  assert loaded.config.model.channels == config.model.channels
  assert loaded.config.model.gamma_min == pytest.approx(-2 * math.log(3 * 17))
  assert dj.load(workdir, step=FIRST_CHECKPOINT).step == FIRST_CHECKPOINT
  with pytest.raises(CheckpointError, match="step 7"):
    dj.load(workdir, step=7)
  with pytest.raises(CheckpointError, match="config.json"):
    dj.load(os.path.join(workdir, "missing"))


def test_scipy_and_diffrax_agree(loaded):
  """Same images, noise and probe: the host RK45 loop and the on-device solve agree within 2
  standard errors of the mean over images (the issue's criterion), and image by image to
  the solver's accuracy: measured up to 0.04 bits/dim at rtol = atol = 1e-5 on this briefly
  trained model, whose ODE takes ~800 evaluations (both agree to 4e-4 at 1e-7)."""
  images = data.load_split(loaded.config.data, "test").images[:16]
  key = jax.random.PRNGKey(5)
  device, rep_d = loaded.bpd(images, key, rtol=1e-5, atol=1e-5)
  host, rep_s = loaded.bpd(images, key, rtol=1e-5, atol=1e-5, solver="scipy_rk45")
  assert rep_d["solver"] == loaded.config.eval.solver and rep_s["solver"] == "scipy_rk45"
  assert abs(rep_d["bpd"] - rep_s["bpd"]) < 2 * math.hypot(rep_d["bpd_stderr"],
                                                           rep_s["bpd_stderr"])
  np.testing.assert_allclose(device, host, atol=0.1)
  assert rep_d["nfe_mean"] > 20 and rep_s["nfe_mean"] > 20


def test_eval_resume_redoes_only_missing_batches(trained, monkeypatch):
  config, workdir = trained
  first = run.evaluate(config, workdir)
  header, rows = _rows(workdir)
  assert first["num_images"] == 48 and len(rows) == 48 and first["checkpoint_step"] == TRAIN_STEPS
  assert [r["index"] for r in rows] == list(range(48))
  # the reproducibility check (on by default) re-solved batch 0 only, and reports it
  checked = [r["index"] for r in rows if "start_sensitivity_bpd" in r]
  assert checked == list(range(16))
  moved = [r["start_sensitivity_bpd"] for r in rows[:16]]
  assert first["start_sensitivity"]["images"] == 16
  assert first["start_sensitivity"]["max_bpd"] == pytest.approx(max(moved))

  # A kill while the second batch was being written: one batch and a cut line survive.
  path = procs.rows_path(workdir)
  with open(path, "w") as f:
    f.write(json.dumps({"header": header}) + "\n")
    for r in rows[:20]:
      f.write(json.dumps(r) + "\n")
    f.write(json.dumps(rows[20])[:15])

  computed = procs.count_evaluated_batches(monkeypatch)
  second = run.evaluate(config, workdir)
  assert computed == [16, 32]  # batch 0 kept, the cut batch 1 redone whole, then batch 2
  _, resumed = _rows(workdir)
  assert [r["index"] for r in resumed] == list(range(48))
  np.testing.assert_allclose([r["bpd"] for r in resumed], [r["bpd"] for r in rows],
                             rtol=1e-6)
  assert second["bpd"] == pytest.approx(first["bpd"], rel=1e-6)

  computed.clear()
  run.evaluate(config, workdir)  # finished: nothing left to compute
  assert computed == []


def test_api_bpd_is_the_eval_loop(trained, loaded):
  """With eval_bpd's key and batch size the API reproduces eval/per_image.jsonl, and
  log_prob is the same bound in nats."""
  config, workdir = trained
  if not os.path.exists(os.path.join(workdir, "eval", "per_image.jsonl")):
    run.evaluate(config, workdir)
  _, rows = _rows(workdir)
  images = data.load_split(loaded.config.data, "test").images[:48]
  key = eval_key(loaded.config)
  bpd, report = loaded.bpd(images, key, batch_size=16)
  np.testing.assert_allclose(bpd, [r["bpd"] for r in rows], rtol=1e-6)
  assert report["checkpoint_step"] == TRAIN_STEPS and report["num_images"] == 48
  for field in ("bpd_stderr", "sde_bpd", "nfe_mean", "dequantization", "num_importance",
                "solver", "rtol", "atol", "divergence", "wall_time_s"):
    assert field in report, field
  assert (report["precision"], report["num_devices"], report["num_processes"]) == (
      "highest", 1, 1)
  log_p = loaded.log_prob(images, key, batch_size=16)
  np.testing.assert_allclose(-log_p / (64 * math.log(2)), bpd, rtol=1e-6)


def test_api_sample_and_bad_input(loaded):
  samples = loaded.sample(jax.random.PRNGKey(0), 5)
  assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.uint8
  assert samples.max() < 17
  with pytest.raises(data.DataError, match="shape"):
    loaded.bpd(np.zeros((2, 4, 4, 1), np.uint8), jax.random.PRNGKey(0))
  with pytest.raises(ConfigError, match="unknown evaluation override"):
    loaded.bpd(np.zeros((2, 8, 8, 1), np.uint8), jax.random.PRNGKey(0), probe="x")


def test_sample_mode_writes_grid_and_npz(trained, capsys):
  config, workdir = trained
  assert cli.dispatch(config, workdir, "sample") == 0
  out_dir = os.path.join(workdir, "samples")
  assert "grid.png" in capsys.readouterr().out
  with np.load(os.path.join(out_dir, "samples.npz")) as npz:
    images, nfe = npz["images"], npz["nfe"]
  assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8 and images.max() < 17
  # 6 samples in batches of 4; a diffrax solve costs 6 evaluations per step plus 1
  assert len(nfe) == 2 and np.all(nfe >= 7)
  with Image.open(os.path.join(out_dir, "grid.png")) as grid:
    assert grid.size == (3 * 65 + 1, 2 * 65 + 1)  # 8x8 digits enlarged 8x, 3 x 2 cells
  report = json.load(open(os.path.join(out_dir, "sample.json")))
  assert report["num_samples"] == 6 and report["checkpoint_step"] == TRAIN_STEPS


def test_sample_without_checkpoint_is_one_line_error(capsys, tmp_path):
  assert cli.dispatch(_tiny(), str(tmp_path / "empty"), "sample") == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: no checkpoints") and "\n" not in err


def test_load_reports_a_config_json_missing_a_field(tmp_path):
  config = _tiny().to_dict()
  del config["sample"]["max_steps"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="lacks the config field 'max_steps'"):
    dj.load(str(tmp_path))


def _initial_model_bpd(images, num_levels: int):
  """(expected mean tn bits/dim of the initialized network over images, its allowance).

  At initialization the U-Net's last convolution is zero, so with the base-measure skip
  F = x_gamma, and the VP velocity drift is c x with c = sigma alpha / 2 =
  1 / (4 cosh(gamma / 2)) (docs/design.md, Parameterizations): a linear ODE with x_1 = e^L x_0 and
  divergence c D,
  L = [arctan(sinh(gamma / 2)) / 2] from gamma_0 to gamma_max. The model density of z_0
  is then N(0, (sigma_1 e^-L)^2 I), and with z_0 = alpha_0 x + sigma_0 eps, eps ~ TN(0, 1;
  [-tau, tau]) of second moment m2, the expected bound per dimension (nats) is
  -e^2L (alpha_0^2 x^2 + sigma_0^2 m2) / (2 sigma_1^2) - log sigma_1 + L
  + m2 / 2 + log sigma_0 + log erf(tau / sqrt 2).

  The allowance: the one tn draw per value adds -log q noise eps^2 / 2 (variance <= 1/2
  per value, eps^2 having variance <= 2), 4 standard errors of it over the n values, plus
  0.1 bits/dim for the solver at rtol = atol = 1e-3 (measured 0.09 at 8 bits on this
  linear ODE against rtol 1e-8) and the two training steps (in all, the two tests below
  measured -0.031 and -0.037 from the expectation).
  """
  g0, g1 = -2.0 * math.log(3.0 * num_levels), 5.0  # default gamma_min (tau = 3), gamma_max
  sig = lambda g: 1.0 / (1.0 + math.exp(-g))
  alpha0, sigma0, sigma1 = math.sqrt(sig(-g0)), math.sqrt(sig(g0)), math.sqrt(sig(g1))
  tau = alpha0 / (sigma0 * num_levels)
  erf = math.erf(tau / math.sqrt(2.0))
  m2 = 1.0 - 2.0 * tau * math.exp(-0.5 * tau**2) / math.sqrt(2.0 * math.pi) / erf
  lam = 0.5 * (math.atan(math.sinh(g1 / 2)) - math.atan(math.sinh(g0 / 2)))
  x = (2.0 * np.asarray(images, np.float64) + 1.0) / num_levels - 1.0
  per_dim = (-math.exp(2 * lam) * (alpha0**2 * x**2 + sigma0**2 * m2) / (2 * sigma1**2)
             - math.log(sigma1) + lam + 0.5 * m2 + math.log(sigma0) + math.log(erf))
  allowance = 4.0 / (math.sqrt(2.0 * x.size) * math.log(2.0)) + 0.1
  return float(-per_dim.mean() / math.log(2.0)), allowance


def _train_and_evaluate_folder(tmp_path, make_image, **data_fields):
  """A tiny run on an image folder (16 train, 4 test images from make_image(rng)):
  (config, workdir, eval report) after 2 training steps."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 16), ("test", 4)):
    (tmp_path / "images" / split).mkdir(parents=True)
    for i in range(n):
      (tmp_path / "images" / split / f"{i}.png").write_bytes(make_image(rng))
  config = _tiny()
  config.data.dataset, config.data.folder = "image_folder", str(tmp_path / "images")
  for name, value in data_fields.items():
    config.data[name] = value
  config.training.num_steps = config.training.checkpoint_every = 2
  config.eval.batch_size = config.eval.num_images = 4
  config.sample.num_samples = config.sample.batch_size = 2
  workdir = str(tmp_path / "run")
  run.train(config, workdir)
  return config, workdir, run.evaluate(config, workdir)


def test_sixteen_bit_image_folder_trains_evaluates_and_samples(tmp_path):
  """V = 65536 end to end: uint16 batches, the windowed decoder, scaled tolerances."""
  import tensorflow as tf

  def ramp_png(rng):  # smooth 16-bit gradients with noise in the low bits
    ramp = np.linspace(0, 60000, 8)[None, :, None] + rng.integers(0, 4000, (8, 8, 1))
    return tf.io.encode_png(tf.constant(ramp.astype(np.uint16))).numpy()

  config, workdir, report = _train_and_evaluate_folder(tmp_path, ramp_png, num_levels=65536)
  assert report["num_images"] == 4 and math.isfinite(report["bpd"])
  assert report["tolerance_scale"] == pytest.approx(1 / 256)
  # two training steps (learning rate 0, then 2e-4) leave the network at its
  # initialization, whose bound is known in closed form (19.8, against 16 bits/dim for a
  # uniform model)
  initial, allowance = _initial_model_bpd(data.load_split(config.data, "test").images, 65536)
  assert abs(report["bpd"] - initial) < allowance, (report["bpd"], initial, allowance)
  run.sample(config, workdir)
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (2, 8, 8, 1) and int(samples["num_levels"]) == 65536
  assert samples["images"].dtype == data.level_dtype(65536)  # uint16, as the data loads
  assert samples["images"].max() < 65536


def test_non_square_images_train_evaluate_and_sample(tmp_path):
  """6x10 RGB images: the network has no fixed shape, and every path reads image_shape."""

  def random_png(rng):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()

  config, workdir, report = _train_and_evaluate_folder(
      tmp_path, random_png, image_size=6, image_width=10, channels=3, num_levels=256)
  assert report["num_images"] == 4
  initial, allowance = _initial_model_bpd(data.load_split(config.data, "test").images, 256)
  assert abs(report["bpd"] - initial) < allowance, (report["bpd"], initial, allowance)
  loaded = dj.load(workdir)
  assert loaded.components.dim == 6 * 10 * 3
  assert loaded.sample(jax.random.PRNGKey(0), 2).shape == (2, 6, 10, 3)
  run.sample(config, workdir)
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "grid.png")))
  assert grid.shape[1] > grid.shape[0]  # two wide images side by side


def test_reproducibility_check_is_the_bound_from_a_moved_start(loaded):
  """evaluate_batches' check: batch 0's rows get |bpd(z0 + 1e-7 v) - bpd(z0)| with v the
  perturbed LogProbFn's signs, computed here from the two bounds directly."""
  from diffode_jax.evaluation import START_PERTURBATION, evaluate_batches
  from diffode_jax.likelihood import make_log_prob_fn

  c = loaded.components
  settings = loaded.eval_settings()
  plain = make_log_prob_fn(c.drift, c.schedule, c.num_levels, settings)
  moved = make_log_prob_fn(c.drift, c.schedule, c.num_levels, settings,
                           start_perturbation=START_PERTURBATION)
  images = data.load_split(loaded.config.data, "test").images[:24]
  key = eval_key(loaded.config)
  rows = [r for batch in evaluate_batches(plain, loaded.params, images, 16, key, settings,
                                          c.dim, perturbed_log_prob_fn=moved) for r in batch]
  assert [("start_sensitivity_bpd" in r) for r in rows] == [True] * 16 + [False] * 8
  bkey = jax.random.fold_in(key, 0)
  a = plain(loaded.params, images[:16], bkey).log_prob
  b = moved(loaded.params, images[:16], bkey).log_prob
  want = np.abs(a - b) / (c.dim * math.log(2))
  np.testing.assert_allclose([r["start_sensitivity_bpd"] for r in rows[:16]], want,
                             rtol=1e-6, atol=1e-12)
  assert np.any(want > 0)  # the start did move


def test_perturbed_start_moves_every_component_by_the_size():
  import jax.numpy as jnp

  from diffode_jax.dequantization import Dequantized
  from diffode_jax.likelihood import _perturbed

  def prepare(k, key):
    return Dequantized(jnp.zeros((3, 2, 2, 1)), jnp.zeros(3), -7.0), None

  deq, probe = _perturbed(prepare, 1e-7, None, jax.random.PRNGKey(0))
  assert probe is None and deq.gamma0 == -7.0
  np.testing.assert_array_equal(np.abs(np.asarray(deq.z0)), np.float32(1e-7))
  assert len(np.unique(np.sign(np.asarray(deq.z0)))) == 2  # both signs


def test_sensitivity_summary_and_warning():
  from diffode_jax import ode
  from diffode_jax.report import REPRODUCIBLE_BPD, sensitivity_warning, start_sensitivity

  assert start_sensitivity([{"bpd": 1.0}]) is None
  rows = [{"start_sensitivity_bpd": v} for v in (1e-4, 3e-4, 2e-3)] + [{"bpd": 1.0}]
  summary = start_sensitivity(rows)
  assert summary == {"images": 3, "median_bpd": pytest.approx(3e-4),
                     "max_bpd": pytest.approx(2e-3), "reproducible": True}
  assert sensitivity_warning(summary, ode.SolverConfig()) is None
  rows.append({"start_sensitivity_bpd": 2 * REPRODUCIBLE_BPD})
  message = sensitivity_warning(start_sensitivity(rows), ode.SolverConfig(rtol=1e-4, atol=1e-4))
  assert message is not None and "not reproducible at rtol=0.0001" in message
  assert "\n" not in message


def test_reproducibility_check_off_adds_no_rows_field_and_no_report_field(trained, tmp_path):
  """eval.reproducibility_check=False: no second solve, so neither the rows nor the report
  carry the check."""
  import shutil

  config, workdir = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
  config = _tiny()
  config.eval.reproducibility_check = False
  report = run.evaluate(config, copy)
  _, rows = _rows(copy)
  assert "start_sensitivity" not in report
  assert not any("start_sensitivity_bpd" in r for r in rows)
