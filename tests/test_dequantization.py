"""Dequantization (docs/design.md, Dequantizations) against direct densities, quadrature and Monte
Carlo."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffode_jax.dequantization import (dequantize, dequantize_for_training,
                                        truncated_normal_log_norm,
                                        truncated_normal_second_moment, truncation)
from diffode_jax.decoder import decoder_log_likelihood
from diffode_jax.likelihood import logmeanexp
from diffode_jax.schedules import Schedule, default_gamma_min, default_gamma_u

SHAPE = (2, 3, 1)
DIM = 6


def _schedule(name, levels):
  return Schedule(name, default_gamma_min(levels), 5.0)


def _images(levels, batch, seed=0):
  k = np.random.default_rng(seed).integers(0, levels, (batch,) + SHAPE)
  k[0].flat[:2] = [0, levels - 1]  # the edge bins
  return jnp.asarray(k.astype(np.uint8 if levels <= 256 else np.int32))


def _centres(k, levels):
  return (2.0 * np.asarray(k, np.float64) + 1.0) / levels - 1.0


def _alpha_sigma(name, gamma):
  if name == "VP":
    return math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
  sigma = 1 / (1 + math.exp(-gamma / 2))
  return 1 - sigma, sigma


CASES = [("VP", 256), ("SP", 256), ("VP", 17), ("SP", 17)]
IDS = [f"{n}-{v}" for n, v in CASES]


def test_truncation_parameters():
  for name, levels in CASES:
    alpha0, sigma0, tau = truncation(_schedule(name, levels), levels)
    a, s = _alpha_sigma(name, default_gamma_min(levels))
    assert float(alpha0) == pytest.approx(a, rel=1e-6)
    assert float(sigma0) == pytest.approx(s, rel=1e-5)
    assert float(tau) == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0, 6.0])
def test_truncated_normal_moments_against_quadrature(tau):
  mass = integrate.quad(lambda e: math.exp(-0.5 * e * e), -tau, tau, epsabs=1e-14)[0]
  second = integrate.quad(lambda e: e * e * math.exp(-0.5 * e * e), -tau, tau,
                          epsabs=1e-14)[0] / mass
  with jax.enable_x64(True):
    assert float(truncated_normal_second_moment(jnp.float64(tau))) == pytest.approx(
        second, rel=1e-10)
    assert float(truncated_normal_log_norm(jnp.float64(tau))) == pytest.approx(
        math.log(mass), rel=1e-10)
  # float32 as the library uses it
  assert float(truncated_normal_second_moment(jnp.float32(tau))) == pytest.approx(second,
                                                                                  rel=1e-5)


@pytest.mark.parametrize("name,levels", CASES, ids=IDS)
def test_tn_stays_in_bin_and_log_weight_is_minus_log_q(name, levels):
  schedule = _schedule(name, levels)
  k = _images(levels, 64)
  deq = jax.jit(lambda key: dequantize("tn", key, k, schedule, levels, -11.8))(
      jax.random.PRNGKey(0))
  alpha0, sigma0 = _alpha_sigma(name, schedule.gamma_min)
  assert deq.gamma0 == schedule.gamma_min
  x = _centres(k, levels)
  z0 = np.asarray(deq.z0, np.float64)
  offset = z0 / alpha0 - x
  assert np.all(np.abs(offset) <= 1.0 / levels * (1 + 1e-4) + 1e-6)
  # not degenerate: the samples spread over most of the bin
  assert np.abs(offset).max() > 0.6 / levels
  # -log q(z0) with q = TN(alpha0 x, sigma0^2; alpha0 * bin), from scipy
  tau = alpha0 / (sigma0 * levels)
  log_q = stats.truncnorm.logpdf(z0, -tau, tau, loc=alpha0 * x, scale=sigma0)
  expected = -log_q.reshape(64, -1).sum(-1)
  # z0 is float32 near 1 while sigma0 is ~1e-3 (V = 256): eps is known to ~1e-4
  # (measured error 2e-4; dropping the D log erf(tau/sqrt 2) term would cost 0.016)
  np.testing.assert_allclose(deq.log_weight, expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("name,levels", [("VP", 256), ("SP", 17)])
def test_tn_analytic_entropy_is_the_mean_of_minus_log_q(name, levels):
  schedule = _schedule(name, levels)
  k = _images(levels, 4000)
  f = jax.jit(lambda key, a: dequantize("tn", key, k, schedule, levels, -11.8, a).log_weight,
              static_argnums=1)
  sampled = np.asarray(f(jax.random.PRNGKey(1), False), np.float64)
  analytic = np.asarray(f(jax.random.PRNGKey(1), True), np.float64)
  assert np.ptp(analytic) < 1e-3 and np.ptp(sampled) > 0.5
  stderr = sampled.std(ddof=1) / math.sqrt(len(sampled))
  assert abs(sampled.mean() - analytic[0]) < 4 * stderr
  # and it is the entropy of the truncated normal written out
  alpha0, sigma0 = _alpha_sigma(name, schedule.gamma_min)
  tau = alpha0 / (sigma0 * levels)
  entropy = DIM * stats.truncnorm.entropy(-tau, tau, scale=sigma0)
  assert analytic[0] == pytest.approx(entropy, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("name,levels", [("VP", 256), ("SP", 17)], ids=["VP-256", "SP-17"])
def test_uniform_states_and_log_weight(name, levels):
  schedule = _schedule(name, levels)
  gamma_u = default_gamma_u(levels)
  k = _images(levels, 4000)
  deq = jax.jit(lambda key: dequantize("u", key, k, schedule, levels, gamma_u))(
      jax.random.PRNGKey(2))
  alpha_u, _ = _alpha_sigma(name, gamma_u)
  assert deq.gamma0 == pytest.approx(gamma_u)
  x = _centres(k, levels)
  scaled = np.asarray(deq.z0, np.float64) / alpha_u - x
  half = 1.0 / levels
  assert np.all(scaled >= -half - 1e-6) and np.all(scaled < half + 1e-6)
  # uniform over the bin: mean 0, variance (2/V)^2 / 12, within Monte Carlo error
  n = scaled.size
  assert abs(scaled.mean()) < 4 * scaled.std() / math.sqrt(n)
  sq = scaled.ravel()**2
  assert abs(sq.mean() - half**2 / 3) < 4 * sq.std() / math.sqrt(n)
  # z0 = alpha_u x_c has density (V / (2 alpha_u))^D on its box: -log q = D log(2 alpha_u / V)
  np.testing.assert_allclose(deq.log_weight, DIM * math.log(2 * alpha_u / levels), rtol=1e-5)


@pytest.mark.parametrize("name", ["VP", "SP"])
def test_variational_log_weight(name):
  levels = 17
  schedule = _schedule(name, levels)
  k = _images(levels, 16)
  deq = jax.jit(lambda key: dequantize("v", key, k, schedule, levels, -11.8))(
      jax.random.PRNGKey(3))
  alpha0, sigma0 = _alpha_sigma(name, schedule.gamma_min)
  x = _centres(k, levels)
  z0 = np.asarray(deq.z0, np.float64)
  log_n = stats.norm.logpdf(z0, alpha0 * x, sigma0).reshape(16, -1).sum(-1)
  log_dec = np.asarray(jax.jit(decoder_log_likelihood, static_argnums=(2, 3))(
      k, deq.z0, schedule, levels), np.float64)
  np.testing.assert_allclose(deq.log_weight, log_dec - log_n, rtol=1e-4, atol=1e-3)
  # z0 is Gaussian around alpha0 x (not truncated): some samples leave the bin
  many = _images(levels, 2000)
  big = jax.jit(lambda key: dequantize("v", key, many, schedule, levels, -11.8).z0)(
      jax.random.PRNGKey(4))
  offset = np.asarray(big, np.float64) / alpha0 - _centres(many, levels)
  assert np.any(np.abs(offset) > 1.0 / levels)
  with pytest.raises(ValueError):
    dequantize("w", jax.random.PRNGKey(0), k, schedule, levels, -11.8)


def test_logmeanexp_includes_minus_log_k():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 7))
  np.testing.assert_allclose(logmeanexp(a), np.log(np.mean(np.exp(a), axis=0)), rtol=1e-12)
  # K equal bounds: the importance-weighted bound is that bound, not bound + log K
  same = np.full((8, 3), -2.5)
  np.testing.assert_allclose(logmeanexp(same), -2.5, rtol=1e-14)
  # stable for bounds of thousands of nats
  big = a - 5000.0
  np.testing.assert_allclose(logmeanexp(big), logmeanexp(a) - 5000.0, rtol=1e-12)
  assert np.all(np.isfinite(logmeanexp(big)))
  # K = 1 is the identity
  np.testing.assert_allclose(logmeanexp(a[:1]), a[0], rtol=1e-14)


@pytest.mark.parametrize("levels", [17, 256])
def test_training_none_is_the_bin_centre(levels):
  schedule = _schedule("VP", levels)
  k = _images(levels, 8)
  x = dequantize_for_training("none", jax.random.PRNGKey(0), k, schedule, levels)
  np.testing.assert_allclose(x, _centres(k, levels), rtol=0, atol=1e-7)
  assert float(x.min()) > -1 and float(x.max()) < 1


@pytest.mark.parametrize("kind", ["u", "tn"])
@pytest.mark.parametrize("name,levels", [("VP", 256), ("SP", 17)], ids=["VP-256", "SP-17"])
def test_training_dequantizers_stay_in_bin_with_right_moments(kind, name, levels):
  schedule = _schedule(name, levels)
  k = _images(levels, 4000)
  x = np.asarray(jax.jit(lambda key: dequantize_for_training(kind, key, k, schedule, levels))(
      jax.random.PRNGKey(5)), np.float64)
  offset = (x - _centres(k, levels)).ravel()
  half = 1.0 / levels
  assert np.all(np.abs(offset) <= half + 1e-6)
  if kind == "u":
    expected_var = half**2 / 3  # width 2/V: (2/V)^2 / 12
  else:
    alpha0, sigma0 = _alpha_sigma(name, schedule.gamma_min)
    tau = alpha0 / (sigma0 * levels)
    m2 = integrate.quad(lambda e: e * e * math.exp(-0.5 * e * e), -tau, tau)[0] / \
        integrate.quad(lambda e: math.exp(-0.5 * e * e), -tau, tau)[0]
    expected_var = (sigma0 / alpha0)**2 * m2
  n = offset.size
  assert abs(offset.mean()) < 4 * offset.std() / math.sqrt(n)
  sq = offset**2
  assert abs(sq.mean() - expected_var) < 4 * sq.std() / math.sqrt(n), (sq.mean(), expected_var)
  with pytest.raises(ValueError):
    dequantize_for_training("gauss", jax.random.PRNGKey(0), k, schedule, levels)
