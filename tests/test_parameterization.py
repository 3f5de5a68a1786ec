"""Parameterizations (docs/design.md, Parameterizations) against the forward path's time derivative
(jax.jvp)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax.parameterization import Parameterization
from diffode_jax.schedules import Schedule

SHAPE = (4, 3, 3, 2)
GAMMA = np.array([-13.0, -4.0, 0.5, 4.9])


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(params=[(k, s) for k in ("eps", "velocity") for s in ("VP", "SP")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def param(request):
  kind, name = request.param
  return Parameterization(kind, Schedule(name, -13.3, 5.0))


@pytest.fixture(params=["VP", "SP"])
def velocity(request):
  return Parameterization("velocity", Schedule(request.param, -13.3, 5.0))


def _data(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.uniform(k1, SHAPE, jnp.float64, -1.0, 1.0)
  eps = jax.random.normal(k2, SHAPE, jnp.float64)
  f = jax.random.normal(k3, SHAPE, jnp.float64)
  return x, eps, f, jnp.asarray(GAMMA)


def _path_velocity(schedule, x, eps, gamma):
  """(x_gamma, d x_gamma / d gamma) of gamma -> alpha(gamma) x + sigma(gamma) eps."""
  return jax.jvp(lambda g: schedule.marginal(x, eps, g), (gamma,), (jnp.ones_like(gamma),))


def _per_example(c, like):
  return jnp.asarray(c).reshape((-1,) + (1,) * (like.ndim - 1))


def test_velocity_target_is_scaled_path_derivative(velocity):
  param = velocity
  x, eps, _, gamma = _data()
  _, dpath = _path_velocity(param.schedule, x, eps, gamma)
  target = param.target(x, eps, gamma)
  # the ratio dpath / target must be one scalar per example (docs/design.md: sigma alpha / 2 for
  # VP, sigma alpha / sqrt 2 for SP)
  alpha, sigma = param.schedule.alpha(gamma), param.schedule.sigma(gamma)
  scale = sigma * alpha / (2.0 if param.schedule.name == "VP" else math.sqrt(2.0))
  np.testing.assert_allclose(dpath, _per_example(scale, x) * target, rtol=1e-12, atol=1e-15)


def test_drift_of_target_is_path_derivative(param):
  """For one (x, eps) pair the drift evaluated at F = F* is exactly d x_gamma / d gamma.

  (For velocity: drift = c F* by construction. For eps: a x_g + b eps equals
  alpha' x + sigma' eps because a = alpha'/alpha and a sigma + b = sigma'.)"""
  x, eps, _, gamma = _data(1)
  x_gamma, dpath = _path_velocity(param.schedule, x, eps, gamma)
  drift = param.drift(param.target(x, eps, gamma), x_gamma, gamma)
  np.testing.assert_allclose(drift, dpath, rtol=1e-10, atol=1e-15)


def test_eps_hat_of_target_is_eps(param):
  x, eps, _, gamma = _data(2)
  x_gamma = param.schedule.marginal(x, eps, gamma)
  np.testing.assert_allclose(param.eps_hat(param.target(x, eps, gamma), x_gamma, gamma), eps,
                             rtol=1e-10, atol=1e-10)


def test_eps_error_is_scaled_output_error(param):
  """eps - eps_hat(F) = eps_scale * (F* - F) for any network output F."""
  x, eps, f, gamma = _data(3)
  x_gamma = param.schedule.marginal(x, eps, gamma)
  lhs = eps - param.eps_hat(f, x_gamma, gamma)
  rhs = _per_example(param.eps_scale(gamma), x) * (param.target(x, eps, gamma) - f)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-12)
  assert float(jnp.max(jnp.abs(lhs))) > 0.1  # F != F*: the identity is not 0 = 0


def test_drift_agrees_with_eps_hat_form(param):
  """For any F the drift equals the schedule's a x_g + b eps_hat(F) (schedule table of
  docs/design.md)."""
  x, eps, f, gamma = _data(4)
  x_gamma = param.schedule.marginal(x, eps, gamma)
  a, b = param.schedule.drift_coefficients(_per_example(gamma, x))
  expected = a * x_gamma + b * param.eps_hat(f, x_gamma, gamma)
  np.testing.assert_allclose(param.drift(f, x_gamma, gamma), expected, rtol=1e-10, atol=1e-14)


def test_eps_drift_uses_schedule_coefficients():
  for name in ("VP", "SP"):
    p = Parameterization("eps", Schedule(name, -13.3, 5.0))
    x, _, f, gamma = _data(5)
    a, b = p.schedule.drift_coefficients(_per_example(gamma, x))
    np.testing.assert_allclose(p.drift(f, x, gamma), a * x + b * f, rtol=1e-14)
    # and explicitly the schedule table of docs/design.md
    sigma = _per_example(p.schedule.sigma(gamma), x)
    lin = -sigma**2 / 2 if name == "VP" else -sigma / 2
    np.testing.assert_allclose(p.drift(f, x, gamma), lin * x + sigma / 2 * f, rtol=1e-12)
    with pytest.raises(ValueError):
      p.drift_scale(gamma)


def test_velocity_drift_scale_is_derivative_wrt_output(velocity):
  param = velocity
  x, eps, f, gamma = _data(6)
  x_gamma = param.schedule.marginal(x, eps, gamma)
  tangent = jnp.ones_like(f)
  _, d = jax.jvp(lambda y: param.drift(y, x_gamma, gamma), (f,), (tangent,))
  np.testing.assert_allclose(d, jnp.broadcast_to(param.drift_scale(gamma, x), d.shape),
                             rtol=1e-14)
  # the drift does not depend on x_gamma for a fixed F
  _, dx = jax.jvp(lambda y: param.drift(f, y, gamma), (x_gamma,), (tangent,))
  np.testing.assert_allclose(dx, 0.0)


def test_scalar_gamma_broadcasts(param):
  x, eps, f, _ = _data(7)
  g = 0.3
  x_gamma = param.schedule.marginal(x, eps, g)
  per_ex = jnp.full((SHAPE[0],), g)
  np.testing.assert_allclose(param.drift(f, x_gamma, g), param.drift(f, x_gamma, per_ex),
                             rtol=1e-14)
  np.testing.assert_allclose(param.target(x, eps, g), param.target(x, eps, per_ex), rtol=1e-14)


def test_unknown_kind():
  with pytest.raises(ValueError):
    Parameterization("score", Schedule("VP", -13.3, 5.0))
