"""Time sampling (docs/design.md, Time sampling) against numerical integration and Monte Carlo."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize

from diffode_jax.losses import LossConfig, make_loss_fn
from diffode_jax.parameterization import Parameterization
from diffode_jax.schedules import Schedule, default_gamma_min
from diffode_jax.time_sampling import TimeSampler, alpha2_integral

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0
U_GRID = np.concatenate([[0.0, 1e-6, 1e-3], np.linspace(0.01, 0.99, 25), [0.999, 1 - 1e-6, 1.0]])


def _alpha2_np(name, g):
  """alpha(g)^2 in float64 numpy, written from the schedule table of docs/design.md (not the
  library)."""
  if name == "VP":
    return 1.0 / (1.0 + math.exp(g))
  return 1.0 / (1.0 + math.exp(g / 2.0)) ** 2


def _integral(fn, lo, hi):
  val, _ = integrate.quad(fn, lo, hi, epsabs=1e-13, epsrel=1e-13, limit=200)
  return val


def _numeric_cdf(name):
  total = _integral(lambda g: _alpha2_np(name, g), GAMMA_MIN, GAMMA_MAX)
  return (lambda g: _integral(lambda t: _alpha2_np(name, t), GAMMA_MIN, g) / total), total


def _numeric_inverse(name, u):
  cdf, _ = _numeric_cdf(name)
  if u <= 0.0:
    return GAMMA_MIN
  if u >= 1.0:
    return GAMMA_MAX
  return optimize.brentq(lambda g: cdf(g) - u, GAMMA_MIN, GAMMA_MAX, xtol=1e-14, rtol=1e-14)


@pytest.fixture(params=["VP", "SP"])
def name(request):
  return request.param


def _sampler(name, importance=True, antithetic=True):
  return TimeSampler(Schedule(name, GAMMA_MIN, GAMMA_MAX), importance=importance,
                     antithetic=antithetic)


def test_normalizer_matches_quadrature(name):
  _, total = _numeric_cdf(name)
  with jax.enable_x64(True):
    assert float(alpha2_integral(Schedule(name, GAMMA_MIN, GAMMA_MAX))) == pytest.approx(
        total, rel=1e-12)
  if name == "VP":  # the closed form of docs/design.md
    assert total == pytest.approx(
        math.log((1 + math.exp(-GAMMA_MIN)) / (1 + math.exp(-GAMMA_MAX))), rel=1e-12)


def test_cdf_matches_quadrature(name):
  cdf, _ = _numeric_cdf(name)
  gammas = np.linspace(GAMMA_MIN, GAMMA_MAX, 23)
  with jax.enable_x64(True):
    got = np.asarray(_sampler(name).cdf(jnp.asarray(gammas)))
  np.testing.assert_allclose(got, [cdf(g) for g in gammas], rtol=0, atol=1e-12)


def test_inverse_cdf_float64(name):
  expected = np.array([_numeric_inverse(name, u) for u in U_GRID])
  with jax.enable_x64(True):
    got = np.asarray(_sampler(name).inverse_cdf(jnp.asarray(U_GRID)))
  # near u = 1 the CDF is flat (alpha^2 = 0.0067 at gamma_max), which amplifies its error
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)


def test_inverse_cdf_float32_within_documented_accuracy(name):
  expected = np.array([_numeric_inverse(name, u) for u in U_GRID])
  got = np.asarray(_sampler(name).inverse_cdf(jnp.asarray(U_GRID, jnp.float32)))
  assert got.dtype == np.float32
  # module docstring: <= 2e-4 even at gamma_max, < 1e-5 (plus float32 resolution of
  # gamma itself, 1e-6 at |gamma| = 13) for gamma < 0
  err = np.abs(got - expected)
  assert err.max() < 2e-4, err
  assert err[expected < 0].max() < 1e-5 + 2e-6, err


def test_cdf_inverts_inverse_cdf(name):
  with jax.enable_x64(True):
    s = _sampler(name)
    u = jnp.asarray(U_GRID)
    np.testing.assert_allclose(s.cdf(s.inverse_cdf(u)), u, rtol=0, atol=1e-12)
    for uniform in (_sampler(name, importance=False),):
      np.testing.assert_allclose(uniform.cdf(uniform.inverse_cdf(u)), u, atol=1e-14)


def test_density_integrates_to_one_and_is_cdf_derivative(name):
  with jax.enable_x64(True):
    for importance in (True, False):
      s = _sampler(name, importance=importance)
      mass = _integral(lambda g: float(s.density(jnp.float64(g))), GAMMA_MIN, GAMMA_MAX)
      assert mass == pytest.approx(1.0, abs=1e-10)
      g = jnp.linspace(GAMMA_MIN, GAMMA_MAX, 17)
      np.testing.assert_allclose(jax.vmap(jax.grad(s.cdf))(g), s.density(g), rtol=1e-9)


def test_antithetic_uniforms_are_a_shifted_grid():
  s = _sampler("VP")
  for batch in (1, 7, 64):
    u = np.asarray(s.uniforms(jax.random.PRNGKey(batch), batch), np.float64)
    assert u.shape == (batch,)
    assert np.all((u >= 0) & (u < 1))
    offsets = np.mod(u - u[0], 1.0)
    np.testing.assert_allclose(np.sort(np.minimum(offsets, 1.0)),
                               np.arange(batch) / batch, atol=1e-6)
  # the shared offset is random: two keys give different grids
  u1 = s.uniforms(jax.random.PRNGKey(1), 8)
  u2 = s.uniforms(jax.random.PRNGKey(2), 8)
  assert not np.allclose(np.sort(u1), np.sort(u2))


def test_iid_uniforms_are_not_a_grid():
  u = np.sort(np.asarray(_sampler("VP", antithetic=False).uniforms(jax.random.PRNGKey(0), 64)))
  assert np.all((u >= 0) & (u < 1))
  assert np.std(np.diff(u)) > 1e-3


def test_sample_returns_inverse_density_weight(name):
  for importance in (True, False):
    s = _sampler(name, importance=importance)
    gamma, weight = s.sample(jax.random.PRNGKey(0), 32)
    assert gamma.shape == weight.shape == (32,)
    assert np.all((gamma >= GAMMA_MIN) & (gamma <= GAMMA_MAX))
    np.testing.assert_allclose(weight, 1.0 / s.density(gamma), rtol=1e-6)


def _h(g):
  return 1.0 + 0.5 * np.sin(g)


def test_importance_estimator_is_unbiased(name):
  """E_p[alpha^2 h / p] = integral of alpha^2 h, for p uniform and p ~ alpha^2."""
  exact = _integral(lambda g: _alpha2_np(name, g) * _h(g), GAMMA_MIN, GAMMA_MAX)
  schedule = Schedule(name, GAMMA_MIN, GAMMA_MAX)
  means = {}
  for importance in (True, False):
    for antithetic in (True, False):
      s = TimeSampler(schedule, importance=importance, antithetic=antithetic)
      keys = jax.random.split(jax.random.PRNGKey(int(importance) * 2 + int(antithetic)), 400)
      gamma, weight = jax.vmap(lambda k: s.sample(k, 64))(keys)
      gamma = np.asarray(gamma, np.float64)
      vals = np.asarray(schedule.alpha(jnp.asarray(gamma)), np.float64)**2 * _h(gamma)
      vals = vals * np.asarray(weight, np.float64)
      # one sample per batch: the antithetic draws within a batch are dependent
      per_batch = vals.mean(axis=1)
      mean, stderr = per_batch.mean(), per_batch.std(ddof=1) / math.sqrt(len(per_batch))
      assert abs(mean - exact) < 4 * stderr, (importance, antithetic, mean, exact, stderr)
      means[importance, antithetic] = (mean, stderr)
  # importance sampling reduces the variance of this alpha^2-weighted integral a lot
  assert means[True, False][1] < 0.75 * means[False, False][1]


def _toy_net(params, x_gamma, gamma, dropout_key, train):
  del dropout_key, train
  g = jnp.sin(gamma).reshape((-1,) + (1,) * (x_gamma.ndim - 1))
  return params["w"] * x_gamma + params["b"] * g


def _expected_diffusion(name, x, w, b, gamma_min):
  """Exact E over (gamma, eps) of the first-order loss of _toy_net, by quadrature.

  F* - F = c_eps eps - (c_x x + b sin g) with c_eps, c_x from docs/design.md, Parameterizations;
  the likelihood
  weight is 0.5 * k(g)^2 with k = alpha (VP) or sqrt(2) alpha (SP)."""
  dim = x.size

  def integrand(g):
    a2 = _alpha2_np(name, g)
    alpha = math.sqrt(a2)
    if name == "VP":
      sigma = math.sqrt(1 - a2)
      c_eps, c_x, k2 = alpha - w * sigma, sigma + w * alpha, a2
    else:
      sigma = 1 - alpha
      c_eps, c_x, k2 = 1 / math.sqrt(2) - w * sigma, 1 / math.sqrt(2) + w * alpha, 2 * a2
    return 0.5 * k2 * (dim * c_eps**2 + np.sum((c_x * x + b * math.sin(g))**2))

  return _integral(integrand, gamma_min, GAMMA_MAX)


def test_importance_sampled_loss_has_the_uniform_loss_mean(name):
  """make_loss_fn's first-order term with p ~ alpha^2 and with uniform p estimates the
  same integral, which quadrature gives exactly for a linear toy network."""
  levels = 17
  gamma_min = default_gamma_min(levels)
  schedule = Schedule(name, gamma_min, GAMMA_MAX)
  param = Parameterization("velocity", schedule)
  params = {"w": jnp.float32(0.3), "b": jnp.float32(-0.7)}
  k = jnp.asarray(np.random.default_rng(0).integers(0, levels, (16, 2, 2, 1)))
  x = (2.0 * np.asarray(k, np.float64) + 1.0) / levels - 1.0
  exact = np.mean([_expected_diffusion(name, x[i], 0.3, -0.7, gamma_min) for i in range(16)])

  results = {}
  batch = jnp.tile(k, (2000, 1, 1, 1))  # 32000 examples, iid (gamma, eps) per example
  for importance in (True, False):
    sampler = TimeSampler(schedule, importance=importance, antithetic=False)
    loss_fn = make_loss_fn(_toy_net, param, sampler, LossConfig(num_levels=levels))
    bpd, terms = jax.jit(lambda key: loss_fn(params, batch, key))(
        jax.random.PRNGKey(int(importance)))
    # per example, averaged over the 16 distinct images: iid draws of one estimator
    per_draw = np.asarray(terms.diffusion, np.float64).reshape(2000, 16).mean(axis=1)
    assert float(bpd) == pytest.approx(per_draw.mean() / (4 * math.log(2)), rel=1e-4)
    mean, stderr = per_draw.mean(), per_draw.std(ddof=1) / math.sqrt(len(per_draw))
    assert abs(mean - exact) < 4 * stderr, (importance, mean, exact, stderr)
    results[importance] = (mean, stderr)
  (m1, s1), (m0, s0) = results[True], results[False]
  assert abs(m1 - m0) < 4 * math.hypot(s1, s0)
