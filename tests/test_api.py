"""The Python API (api.py): settings objects, the shared report, and its own errors."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

import diffode_jax as dj
import procs
from diffode_jax import data
from diffode_jax.errors import (CheckpointError, ConfigError, DataError, DiffodeError,
                                WorkdirError)

NUM_TRAIN = 8


@pytest.fixture(scope="module")
def oracle_and_images():
  from configs import digits

  config = digits.get_config()
  config.eval.rtol = config.eval.atol = 1e-4
  train = data.load_split(config.data, "train").images[:NUM_TRAIN]
  return dj.oracle(train, config), train


def test_settings_object_equals_the_keyword_overrides(oracle_and_images):
  model, train = oracle_and_images
  key = jax.random.PRNGKey(3)
  by_keywords, report = model.bpd(train[:4], key, dequantization="u", rtol=1e-4, atol=1e-4)
  settings = dj.EvalSettings(dequantization="u", gamma_u=model.config.eval.gamma_u,
                             solver=dj.SolverConfig(solver=model.config.eval.solver,
                                                    rtol=1e-4, atol=1e-4,
                                                    max_steps=model.config.eval.max_steps))
  by_object, report2 = model.bpd(train[:4], key, settings=settings)
  np.testing.assert_array_equal(by_keywords, by_object)
  assert model.eval_settings(dequantization="u", rtol=1e-4, atol=1e-4) == settings
  # The report names the model and the settings.
  for field in ("schedule", "parameterization", "gamma_min", "gamma_max", "dequantization",
                "gamma_u", "solver", "rtol", "tolerance_scale", "bpd", "bpd_stderr",
                "sde_bpd", "nfe_mean", "num_images", "batch_size", "wall_time_s"):
    assert field in report, field
  assert report["schedule"] == "VP" and report["parameterization"] == "velocity"
  assert report["num_images"] == 4 and report["gamma_u"] == model.config.eval.gamma_u
  # log_prob is the same bound in nats (-log2 P / D = bpd), with the same keys.
  log_p = model.log_prob(train[:4], key, dequantization="u", rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(-log_p / (64 * math.log(2)), by_keywords, rtol=1e-12)
  # per_image: the same rows with their ELBO, and the report's means are theirs.
  rows, report3 = model.per_image(train[:4], key, dequantization="u", rtol=1e-4, atol=1e-4)
  assert [r["index"] for r in rows] == [0, 1, 2, 3]
  np.testing.assert_array_equal([r["bpd"] for r in rows], by_keywords)
  assert report3["sde_bpd"] == pytest.approx(np.mean([r["sde_bpd"] for r in rows]), rel=1e-12)
  assert report3["nfe_mean"] == np.mean([r["nfe"] for r in rows])


def test_settings_and_overrides_together_or_unknown_are_config_errors(oracle_and_images):
  model, train = oracle_and_images
  key = jax.random.PRNGKey(0)
  with pytest.raises(ConfigError, match="either settings= or keyword overrides"):
    model.bpd(train[:2], key, settings=dj.EvalSettings(), dequantization="u")
  with pytest.raises(ConfigError, match="EvalSettings"):
    model.bpd(train[:2], key, settings={"dequantization": "u"})
  with pytest.raises(ConfigError, match="unknown evaluation override"):
    model.log_prob(train[:2], key, probe="x")
  with pytest.raises(ConfigError, match="num_importance"):
    model.bpd(train[:2], key, num_importance=0)
  with pytest.raises(DataError, match="integers"):
    model.bpd(train[:2].astype(np.float32), key)


def test_load_errors_are_diffode_errors(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    dj.load(str(tmp_path / "absent"))
  (tmp_path / "config.json").write_text("{ not json")
  with pytest.raises(CheckpointError, match="not a valid config.json"):
    dj.load(str(tmp_path))
  with pytest.raises(WorkdirError, match="only local paths and gs:// URLs"):
    dj.load("s3://bucket/run")
  for error in (CheckpointError, ConfigError, DataError, WorkdirError):
    assert issubclass(error, dj.DiffodeError) and issubclass(error, DiffodeError)


@pytest.mark.subprocess
def test_the_api_does_not_import_the_runner():
  code = ("import sys, diffode_jax as dj; "
          "print(sorted(m for m in sys.modules if m.startswith('diffode_jax.run')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=procs.REPO, env=procs.env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().replace("'", '"')) == []


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x, k: m.bpd(x, k, batch_size=-4), ConfigError, "batch_size must be an integer >= 1"),
    (lambda m, x, k: m.bpd(x, k, batch_size=2.5), ConfigError, "batch_size must be an integer"),
    (lambda m, x, k: m.bpd(x, 0), ConfigError, "key must be a JAX PRNG key"),
    (lambda m, x, k: m.log_prob(x, "seed"), ConfigError, "key must be a JAX PRNG key"),
    (lambda m, x, k: m.per_image(x, np.zeros(3, np.uint32)), ConfigError, "shape (3,)"),
    (lambda m, x, k: m.bpd(x[0], k), DataError, "is one image; pass a batch"),
    (lambda m, x, k: m.bpd(x[:, :4], k), DataError, "images have shape (4, 8, 1)"),
    (lambda m, x, k: m.bpd(x[..., 0], k), DataError, "an array of shape (4, 8, 8)"),
    (lambda m, x, k: m.bpd([[1, 2], [3]], k), DataError, "integer array"),
    (lambda m, x, k: m.bpd(x, k, num_importance=0), ConfigError, "eval.num_importance"),
    (lambda m, x, k: m.bpd(x, k, dequantization="u", gamma_u=9.0), ConfigError,
     "must lie in the model's range"),
    (lambda m, x, k: m.sample(k, 0), ConfigError, "n must be an integer >= 1, got 0"),
    (lambda m, x, k: m.sample(k, 2.0), ConfigError, "n must be an integer >= 1"),
    (lambda m, x, k: m.sample(k, 2, batch_size=0), ConfigError, "batch_size must be"),
    (lambda m, x, k: m.sample(7, 2), ConfigError, "key must be a JAX PRNG key"),
])
def test_bad_arguments_are_one_line_diffode_errors(oracle_and_images, call, error, message):
  """Every argument the API takes is checked before any work, as a DiffodeError."""
  model, train = oracle_and_images
  with pytest.raises(error) as err:
    call(model, train[:4], jax.random.PRNGKey(0))
  assert isinstance(err.value, DiffodeError)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_new_style_keys_are_accepted(oracle_and_images):
  """jax.random.key (typed) and PRNGKey (raw uint32) give the same kind of answer."""
  model, train = oracle_and_images
  typed, _ = model.bpd(train[:2], jax.random.key(3), rtol=1e-4, atol=1e-4)
  raw, _ = model.bpd(train[:2], jax.random.PRNGKey(3), rtol=1e-4, atol=1e-4)
  assert np.all(np.isfinite(typed))
  np.testing.assert_allclose(typed, raw, atol=1e-3)
