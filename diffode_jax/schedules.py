"""Noise schedules in gamma-time (SPEC 2).

Convention: gamma = -log SNR = log(sigma^2 / alpha^2). The data end is gamma_min
(almost no noise), the noise end is gamma_max. The forward path is

    x_gamma = alpha(gamma) * x + sigma(gamma) * eps,   eps ~ N(0, I).

Two schedules are provided:

* ``VP`` (variance preserving): sigma^2 = sigmoid(gamma), alpha^2 = sigmoid(-gamma),
  so alpha^2 + sigma^2 = 1.
* ``SP`` (straight path): sigma = sigmoid(gamma / 2), alpha = 1 - sigma, so the path is
  a straight line between x and eps.

In gamma-time the probability-flow ODE of either schedule is

    dx/dgamma = (d log alpha / dgamma) * x + sigma / 2 * eps_hat(x, gamma),

because the diffusion coefficient g^2 = d sigma^2/dgamma - 2 (d log alpha/dgamma) sigma^2
equals sigma^2 * d/dgamma log(sigma^2 / alpha^2) = sigma^2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

SCHEDULES = ("VP", "SP")

# The truncated normal of SPEC 5 lives on [-tau, tau] with tau = alpha_0 / (sigma_0 V);
# the reference gamma_min makes tau = 3 (so 0.27% of a standard normal's mass is cut).
DEFAULT_TAU = 3.0


def default_gamma_min(num_levels: int, tau: float = DEFAULT_TAU) -> float:
  """gamma_min such that alpha/sigma at gamma_min equals tau * V (SPEC 2).

  -2 log(tau V): -13.28 for V = 256, about -7.86 for V = 17. Valid for both schedules,
  since gamma = log(sigma^2 / alpha^2) by definition.
  """
  if num_levels < 2:
    raise ValueError(f"num_levels must be >= 2, got {num_levels}")
  return -2.0 * math.log(tau * num_levels)


def default_gamma_u(num_levels: int) -> float:
  """Start time of the ODE for uniform dequantization (SPEC 5).

  The reference value is -11.8 for V = 256; for other bit depths the same relative
  noise level is -11.8 + 2 log(256 / V), which is gamma_min + 1.5 to within 0.02.
  """
  return -11.8 + 2.0 * math.log(256.0 / num_levels)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A noise schedule on [gamma_min, gamma_max].

  All functions take gamma (any shape) and broadcast elementwise.
  """

  name: str
  gamma_min: float
  gamma_max: float

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.name!r}; expected one of {SCHEDULES}")
    if not self.gamma_min < self.gamma_max:
      raise ValueError(
          f"gamma_min ({self.gamma_min}) must be below gamma_max ({self.gamma_max})")

  @property
  def width(self) -> float:
    """gamma_max - gamma_min."""
    return self.gamma_max - self.gamma_min

  def gamma_from_t(self, t):
    """Maps t in [0, 1] linearly to gamma (t = 0 is the data end)."""
    return self.gamma_min + self.width * t

  def sigma(self, gamma):
    if self.name == "VP":
      return jnp.sqrt(jax.nn.sigmoid(gamma))
    return jax.nn.sigmoid(gamma / 2)

  def alpha(self, gamma):
    if self.name == "VP":
      return jnp.sqrt(jax.nn.sigmoid(-gamma))
    # 1 - sigmoid(g/2) written without cancellation.
    return jax.nn.sigmoid(-gamma / 2)

  def dsigma(self, gamma):
    """d sigma / d gamma."""
    sigma, alpha = self.sigma(gamma), self.alpha(gamma)
    if self.name == "VP":
      return 0.5 * sigma * alpha**2
    return 0.5 * sigma * alpha

  def dalpha(self, gamma):
    """d alpha / d gamma."""
    sigma, alpha = self.sigma(gamma), self.alpha(gamma)
    if self.name == "VP":
      return -0.5 * alpha * sigma**2
    return -0.5 * sigma * alpha

  def dlog_alpha(self, gamma):
    """d log alpha / d gamma: the linear coefficient of the ODE drift."""
    if self.name == "VP":
      return -0.5 * self.sigma(gamma) ** 2
    return -0.5 * self.sigma(gamma)

  def drift_coefficients(self, gamma):
    """(a, b) with dx/dgamma = a * x + b * eps_hat along the probability-flow ODE."""
    return self.dlog_alpha(gamma), 0.5 * self.sigma(gamma)

  def marginal(self, x, eps, gamma):
    """x_gamma = alpha x + sigma eps; gamma broadcasts against the leading axis of x."""
    g = expand_like(gamma, x)
    return self.alpha(g) * x + self.sigma(g) * eps


def expand_like(gamma, x):
  """Reshapes a per-example gamma of shape (B,) to broadcast against x of shape (B, ...)."""
  gamma = jnp.asarray(gamma)
  if gamma.ndim == 0:
    return gamma
  return gamma.reshape(gamma.shape + (1,) * (x.ndim - gamma.ndim))


def make_schedule(config_model) -> Schedule:
  """Builds the schedule of ``config.model`` (fields schedule, gamma_min, gamma_max)."""
  return Schedule(config_model.schedule, float(config_model.gamma_min),
                  float(config_model.gamma_max))
