"""Schedules (docs/design.md, Schedules) against closed forms, autodiff and the Gaussian
probability flow."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax.schedules import (DEFAULT_TAU, Schedule, default_gamma_min,
                                   default_gamma_u, expand_like)

GAMMAS = np.linspace(-14.0, 6.0, 41)


@pytest.fixture(params=["VP", "SP"])
def schedule(request):
  return Schedule(request.param, -13.3, 5.0)


def test_vp_preserves_variance():
  s = Schedule("VP", -13.3, 5.0)
  with jax.enable_x64(True):
    g = jnp.asarray(GAMMAS)
    np.testing.assert_allclose(s.alpha(g)**2 + s.sigma(g)**2, 1.0, rtol=1e-14)


def test_sp_is_a_straight_path():
  s = Schedule("SP", -13.3, 5.0)
  with jax.enable_x64(True):
    g = jnp.asarray(GAMMAS)
    np.testing.assert_allclose(s.alpha(g) + s.sigma(g), 1.0, rtol=1e-14)


def test_gamma_is_log_noise_to_signal(schedule):
  with jax.enable_x64(True):
    g = jnp.asarray(GAMMAS)
    alpha, sigma = schedule.alpha(g), schedule.sigma(g)
    assert np.all(alpha > 0) and np.all(sigma > 0)
    np.testing.assert_allclose(jnp.log(sigma**2 / alpha**2), GAMMAS, rtol=0, atol=1e-12)


def test_float32_round_trip_at_the_ends(schedule):
  # At gamma_min sigma ~ 1e-3 and at gamma_max alpha is small: both stay accurate in float32.
  g = jnp.float32(-13.3)
  np.testing.assert_allclose(float(jnp.log(schedule.sigma(g)**2 / schedule.alpha(g)**2)),
                             -13.3, atol=1e-5)
  g = jnp.float32(5.0)
  np.testing.assert_allclose(float(jnp.log(schedule.sigma(g)**2 / schedule.alpha(g)**2)),
                             5.0, atol=1e-5)


@pytest.mark.parametrize("name", ["dsigma", "dalpha", "dlog_alpha"])
def test_derivatives_match_autodiff(schedule, name):
  with jax.enable_x64(True):
    g = jnp.asarray(GAMMAS)
    fn = {"dsigma": schedule.sigma, "dalpha": schedule.alpha,
          "dlog_alpha": lambda x: jnp.log(schedule.alpha(x))}[name]
    expected = jax.vmap(jax.grad(fn))(g)
    # autodiff of sqrt(sigmoid) goes through 1 - sigmoid(-g), which cancels near
    # gamma_min (relative error ~1e-10 in float64); the closed forms do not.
    np.testing.assert_allclose(getattr(schedule, name)(g), expected, rtol=1e-8, atol=1e-300)


def test_coefficients_hold_every_accessor_and_pass_through_jit(schedule):
  """One call gives alpha, sigma and the derivatives; the accessors are its fields, and
  dalpha / alpha is dlog_alpha (written in closed form, so equal to rounding only)."""
  g = jnp.asarray(GAMMAS, jnp.float32)
  c = jax.jit(schedule.coefficients)(g)  # a pytree: it leaves jit whole
  for name in ("alpha", "sigma", "dalpha", "dsigma", "dlog_alpha"):
    np.testing.assert_array_equal(getattr(c, name), getattr(schedule, name)(g))
  a, b = schedule.drift_coefficients(g)
  np.testing.assert_array_equal(a, c.dlog_alpha)
  np.testing.assert_array_equal(b, 0.5 * c.sigma)
  np.testing.assert_allclose(c.dalpha / c.alpha, c.dlog_alpha, rtol=1e-5)


def test_gamma_from_t(schedule):
  assert schedule.width == pytest.approx(18.3)
  assert float(schedule.gamma_from_t(0.0)) == pytest.approx(-13.3)
  assert float(schedule.gamma_from_t(1.0)) == pytest.approx(5.0)
  assert float(schedule.gamma_from_t(0.25)) == pytest.approx(-13.3 + 0.25 * 18.3)


@pytest.mark.parametrize("data_std", [0.3, 1.0, 2.5])
def test_drift_transports_gaussian_variance(schedule, data_std):
  """For x ~ N(0, s^2), x_g ~ N(0, v) with v = alpha^2 s^2 + sigma^2 and the exact
  eps* = sigma x_g / v. A linear drift c x transports the variance iff v' = 2 c v, so the
  PF-ODE drift a x + b eps* must satisfy v' = 2 (a + b sigma / v) v. The s^2 part checks
  a, the constant part checks b."""
  with jax.enable_x64(True):
    var = lambda g: schedule.alpha(g)**2 * data_std**2 + schedule.sigma(g)**2
    g = jnp.asarray(GAMMAS)
    dvar = jax.vmap(jax.grad(var))(g)
    a, b = schedule.drift_coefficients(g)
    v = var(g)
    c = a + b * schedule.sigma(g) / v  # drift = c * x_g
    np.testing.assert_allclose(2.0 * c * v, dvar, rtol=1e-8, atol=1e-14)


def test_drift_matches_conditional_path_velocity(schedule):
  """E[d x_g / d gamma | x_g] = (alpha'/alpha) x_g + (sigma' - sigma alpha'/alpha) eps_hat,
  so drift_coefficients must equal these (the probability flow is the mean path velocity)."""
  with jax.enable_x64(True):
    g = jnp.asarray(GAMMAS)
    alpha, sigma = schedule.alpha(g), schedule.sigma(g)
    dalpha = jax.vmap(jax.grad(schedule.alpha))(g)
    dsigma = jax.vmap(jax.grad(schedule.sigma))(g)
    a, b = schedule.drift_coefficients(g)
    np.testing.assert_allclose(a, dalpha / alpha, rtol=1e-8)
    np.testing.assert_allclose(b, dsigma - sigma * dalpha / alpha, rtol=1e-8)
    # the diffusion coefficient in gamma-time is sigma^2 (module docstring): b = g^2/(2 sigma)
    np.testing.assert_allclose(b, sigma / 2, rtol=1e-10)


def test_default_gamma_min():
  assert default_gamma_min(256) == pytest.approx(-13.28, abs=0.01)
  assert default_gamma_min(17) == pytest.approx(-7.86, abs=0.01)
  for v in (2, 17, 256):
    assert default_gamma_min(v) == pytest.approx(-2 * math.log(3.0 * v), rel=1e-12)
  with pytest.raises(ValueError):
    default_gamma_min(1)


@pytest.mark.parametrize("name", ["VP", "SP"])
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_default_gamma_min_gives_tau(name, levels):
  """alpha / sigma at the default gamma_min is tau * V in both schedules."""
  with jax.enable_x64(True):
    s = Schedule(name, default_gamma_min(levels), 5.0)
    g = jnp.float64(s.gamma_min)
    assert float(s.alpha(g) / s.sigma(g)) == pytest.approx(DEFAULT_TAU * levels, rel=1e-10)


def test_default_gamma_u():
  assert default_gamma_u(256) == pytest.approx(-11.8, abs=1e-12)
  for v in (2, 5, 17, 64, 256, 1024):
    assert abs(default_gamma_u(v) - (default_gamma_min(v) + 1.5)) < 0.02
  # halving the bit depth's level count moves gamma_u by 2 log 2
  assert default_gamma_u(128) - default_gamma_u(256) == pytest.approx(2 * math.log(2))


def test_schedule_validation():
  with pytest.raises(ValueError):
    Schedule("cosine", -13.3, 5.0)
  with pytest.raises(ValueError):
    Schedule("VP", 5.0, -13.3)


def test_marginal_broadcasts_per_example(schedule):
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key1, (3, 2, 2, 1))
  eps = jax.random.normal(key2, (3, 2, 2, 1))
  gamma = jnp.array([-10.0, 0.0, 4.0])
  out = schedule.marginal(x, eps, gamma)
  for i in range(3):
    expected = schedule.alpha(gamma[i]) * x[i] + schedule.sigma(gamma[i]) * eps[i]
    np.testing.assert_allclose(out[i], expected, rtol=1e-6)
  assert expand_like(gamma, x).shape == (3, 1, 1, 1)
  assert expand_like(jnp.float32(1.0), x).shape == ()
