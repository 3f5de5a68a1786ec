"""The closed-form oracle of a finite data set (docs/design.md, The oracle): formulas, then known
bounds end to end.

On N training images the empirical distribution gives P(k) = 1/N, so the `tn` bound must
come out at log2(N) / D bits/dim, up to the truncation term -log2 erf(tau / sqrt 2) (exact:
q is the mixture component renormalized to the bin), the N(0, sigma_max^2) prior used
instead of the exact mixture at gamma_max and the ODE error (docs/design.md, Numerical facts:
together well under
0.01 bits/dim).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm

import diffode_jax as dj
from diffode_jax import data, run
from diffode_jax.dequantization import truncation
from diffode_jax.likelihood import LikelihoodError
from diffode_jax.config import finalize_config
from diffode_jax.errors import ConfigError
from diffode_jax.model import build
from diffode_jax.oracle import posterior_means
from diffode_jax.schedules import Schedule

NUM_TRAIN = 16


@pytest.fixture(scope="module")
def digits_sets():
  from configs import digits

  config = digits.get_config()
  train = data.load_split(config.data, "train").images[:NUM_TRAIN]
  held_out = data.load_split(config.data, "test").images[:4]
  return config, train, held_out


@pytest.fixture(scope="module")
def oracle_model(digits_sets):
  config, train, _ = digits_sets
  return dj.oracle(train, config)


def _mixture_log_density(train_x, x_g, alpha, sigma):
  """log (1/N) sum_i prod_d N(x_g,d; alpha x_i,d, sigma^2), written independently."""
  xs = train_x.reshape(train_x.shape[0], -1)
  xg = x_g.reshape(x_g.shape[0], -1)
  per_point = norm.logpdf(xg[:, None, :], alpha[:, None, None] * xs[None],
                          sigma[:, None, None]).sum(-1)
  return logsumexp(per_point, axis=1) - math.log(xs.shape[0])


@pytest.mark.parametrize("name", ["VP", "SP"])
def test_posterior_means_are_tweedie_of_the_mixture(name):
  """eps_hat = -sigma grad log p_gamma and x_hat = (x_g + sigma^2 grad log p) / alpha."""
  with jax.enable_x64(True):
    schedule = Schedule(name, -13.3, 5.0)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    train_x = jax.random.uniform(k1, (5, 2, 2, 3), jnp.float64, -1.0, 1.0)
    gamma = jnp.array([-12.0, -3.0, 0.0, 4.0])
    alpha, sigma = schedule.alpha(gamma), schedule.sigma(gamma)
    pick = jax.random.randint(k2, (4,), 0, 5)
    x_g = (alpha[:, None, None, None] * train_x[pick]
           + sigma[:, None, None, None] * jax.random.normal(k3, (4, 2, 2, 3), jnp.float64))
    x_hat, eps_hat, log_mix = posterior_means(train_x, x_g, alpha, sigma)
    score = jax.grad(lambda x: _mixture_log_density(train_x, x, alpha, sigma).sum())(x_g)
    s = sigma[:, None, None, None]
    np.testing.assert_allclose(log_mix, _mixture_log_density(train_x, x_g, alpha, sigma),
                               rtol=1e-12)
    np.testing.assert_allclose(eps_hat, -s * score, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(x_hat, (x_g + s**2 * score) / alpha[:, None, None, None],
                               rtol=1e-9, atol=1e-9)


def test_chunked_streaming_softmax_equals_one_block():
  """Many chunks (the last one padded) give the single-block answer, values and jvp."""
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    train_x = jax.random.uniform(k1, (7, 3, 3, 1), jnp.float64, -1.0, 1.0)
    x_g = jax.random.normal(k2, (2, 3, 3, 1), jnp.float64) * 0.3
    alpha, sigma = jnp.array([0.9, 0.6]), jnp.array([0.2, 0.5])
    tangent = jax.random.normal(k3, x_g.shape, jnp.float64)

    def run_with(block):
      return jax.jvp(lambda x: posterior_means(train_x, x, alpha, sigma, block), (x_g,),
                     (tangent,))

    one = run_with(1 << 20)
    chunked = run_with(2 * 9 * 2)  # chunks of 2 training points: 4 chunks, 1 padded slot
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(chunked)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", ["VP", "SP"])
def test_eps_and_velocity_oracles_give_the_same_drift(digits_sets, schedule):
  """Both parameterizations of the exact model describe the one exact ODE."""
  config, train, _ = digits_sets
  with jax.enable_x64(True):
    drifts = []
    for parameterization in ("eps", "velocity"):
      c = config.copy_and_resolve_references()
      c.model.arch, c.model.schedule = "oracle", schedule
      c.model.parameterization = parameterization
      c.training.importance_sampling = parameterization == "velocity"
      components = build(finalize_config(c), train_images=train)
      params = components.init_params(None).astype(jnp.float64)
      x = jax.random.normal(jax.random.PRNGKey(2), (3,) + train.shape[1:], jnp.float64)
      drifts.append([components.drift(params, x, jnp.asarray(g, jnp.float64))
                     for g in (-7.0, -1.0, 3.0)])
    for a, b in zip(drifts[0], drifts[1]):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_tn_bound_on_training_images_is_log2_n_over_d(oracle_model, digits_sets):
  _, train, _ = digits_sets
  model = oracle_model
  bpd, report = model.bpd(train, jax.random.PRNGKey(0), dequantization="tn",
                          divergence="exact")
  _, _, tau = truncation(model.components.schedule, model.components.num_levels)
  expected = (math.log2(NUM_TRAIN) / model.components.dim
              - math.log2(math.erf(float(tau) / math.sqrt(2.0))))
  assert report["num_images"] == NUM_TRAIN and report["dequantization"] == "tn"
  assert abs(bpd.mean() - expected) < 0.01, (bpd.mean(), expected)
  assert np.all(np.abs(bpd - expected) < 0.03), bpd


def test_tn_is_tight_and_u_is_not_on_8_bit_photo_tiles():
  """The 8-bit case of the paper's claim, on the oracle of 16 photo_patches tiles (V = 256,
  gamma_min = -13.3): `tn` meets log2(N)/D up to the truncation term, `u` is far above."""
  from configs import photo_patches

  config = photo_patches.get_config()
  train = data.load_split(config.data, "train").images[:NUM_TRAIN]
  model = dj.oracle(train, config)
  images = train[:4]
  tn, _ = model.bpd(images, jax.random.PRNGKey(0), dequantization="tn", divergence="exact")
  u, _ = model.bpd(images, jax.random.PRNGKey(0), dequantization="u", divergence="exact")
  _, _, tau = truncation(model.components.schedule, model.components.num_levels)
  expected = (math.log2(NUM_TRAIN) / model.components.dim
              - math.log2(math.erf(float(tau) / math.sqrt(2.0))))
  assert model.components.num_levels == 256 and model.components.dim == 192
  assert abs(tn.mean() - expected) < 0.01, (tn.mean(), expected)
  assert u.mean() > tn.mean() + 0.2, (u.mean(), tn.mean())


def test_tn_is_tight_on_16_bit_images():
  """Bit depth is only a parameter: the same log2(N)/D bound at V = 65536 (gamma_min from
  V: -24.4), where the decoder scores a window of bins rather than all 65536."""
  from configs import photo_patches

  config = photo_patches.get_config()
  tiles = data.load_split(config.data, "train").images[:NUM_TRAIN]
  low_bits = np.random.default_rng(0).integers(0, 256, tiles.shape)
  train = (tiles.astype(np.uint16) << 8) | low_bits.astype(np.uint16)
  config.data.num_levels = 65536
  model = dj.oracle(train, config)
  images = train[:2]
  tn, report = model.bpd(images, jax.random.PRNGKey(0), dequantization="tn",
                         divergence="exact")
  _, _, tau = truncation(model.components.schedule, model.components.num_levels)
  expected = (math.log2(NUM_TRAIN) / model.components.dim
              - math.log2(math.erf(float(tau) / math.sqrt(2.0))))
  assert model.components.num_levels == 65536
  assert abs(tn.mean() - expected) < 0.01, (tn.mean(), expected)
  assert np.isfinite(report["sde_bpd"])


def test_uniform_is_worse_and_importance_weighting_helps(oracle_model, digits_sets):
  """`u` loses to `tn` (it spends mass outside the data's Gaussian); K = 8 beats K = 1."""
  _, train, _ = digits_sets
  key = jax.random.PRNGKey(0)
  tn, _ = oracle_model.bpd(train, key, dequantization="tn", divergence="exact")
  u1, _ = oracle_model.bpd(train, key, dequantization="u", divergence="exact")
  u8, report = oracle_model.bpd(train, key, dequantization="u", divergence="exact",
                                num_importance=8)
  assert report["num_importance"] == 8
  assert u1.mean() > tn.mean() + 0.1
  assert u8.mean() < u1.mean()
  assert u8.mean() > tn.mean()  # still a bound on the same P(k) = 1/N


def test_held_out_images_are_far_worse(oracle_model, digits_sets):
  """The empirical distribution gives held-out images almost no mass."""
  _, _, held_out = digits_sets
  bpd, report = oracle_model.bpd(held_out, jax.random.PRNGKey(0), divergence="exact",
                                 rtol=1e-3, atol=1e-3)
  assert np.all(bpd > 10.0), bpd
  assert report["nfe_mean"] > 100  # stiff off the data (docs/design.md, Numerical facts)


def test_solver_failure_is_reported_not_a_number(oracle_model, digits_sets):
  """Off the data the stiff oracle ODE exhausts max_steps: an error, not a quiet bound."""
  _, _, held_out = digits_sets
  with pytest.raises(LikelihoodError, match="max_steps=16"):
    oracle_model.bpd(held_out, jax.random.PRNGKey(0), max_steps=16)


def test_oracle_samples_are_training_images(oracle_model, digits_sets):
  """The flow of the empirical distribution carries noise onto the training points.

  It ends at p_gamma_min, a Gaussian of standard deviation exp(gamma_min / 2) = 1 / (3 V)
  around each point in x-space, i.e. a third of a bin: the decoder returns the training
  image except for pixels beyond 3 standard deviations (0.27% each), off by one level.
  """
  _, train, _ = digits_sets
  samples = oracle_model.sample(jax.random.PRNGKey(3), 8, batch_size=8)
  assert samples.dtype == np.uint8 and samples.shape == (8,) + train.shape[1:]
  flat_train = train.reshape(len(train), -1).astype(int)
  for s in samples.reshape(8, -1).astype(int):
    nearest = flat_train[np.argmin(np.abs(flat_train - s).sum(axis=1))]
    assert np.abs(nearest - s).max() <= 1
    assert np.mean(nearest != s) <= 0.05


def test_oracle_cannot_be_trained(tiny_config, tmp_path):
  tiny_config.model.arch = "oracle"
  with pytest.raises(ConfigError, match="nothing to train"):
    run.train(tiny_config, str(tmp_path / "w"))


def test_oracle_api_checks_images(digits_sets):
  config, train, _ = digits_sets
  with pytest.raises(data.DataError, match="integers"):
    dj.oracle(train.astype(np.float32), config)
  with pytest.raises(data.DataError, match="num_levels"):
    dj.oracle(np.full((2, 8, 8, 1), 20, np.uint8), config)


def test_solver_tolerances_scale_with_the_start_noise():
  """Only starts finer than the 8-bit default are tightened, in proportion to the noise."""
  from diffode_jax.likelihood import EvalSettings, effective_solver
  from diffode_jax.ode import tolerance_scale
  from diffode_jax.schedules import default_gamma_min, default_gamma_u

  for levels in (2, 17, 256):
    assert tolerance_scale(default_gamma_min(levels)) == 1.0
    assert tolerance_scale(default_gamma_u(levels)) == 1.0
  # sigma_0 / alpha_0 = 1 / (3 V): 16-bit data is 256 times finer than 8-bit
  assert math.isclose(tolerance_scale(default_gamma_min(65536)), 1 / 256, rel_tol=1e-9)
  schedule = Schedule("VP", default_gamma_min(65536), 5.0)
  tol = EvalSettings().solver.rtol
  tn = effective_solver(EvalSettings(), schedule)
  assert math.isclose(tn.rtol, tol / 256) and math.isclose(tn.atol, tol / 256)
  u = effective_solver(EvalSettings(dequantization="u", gamma_u=default_gamma_u(65536)),
                       schedule)
  assert math.isclose(u.rtol, tol * math.exp((default_gamma_u(65536)
                                                - default_gamma_min(256)) / 2))
