"""Noise schedules in gamma-time (docs/design.md, Schedules).

Convention: gamma = -log SNR = log(sigma^2 / alpha^2). The data end is gamma_min
(almost no noise), the noise end is gamma_max. The forward path is

    x_gamma = alpha(gamma) * x + sigma(gamma) * eps,   eps ~ N(0, I).

Two schedules are provided, each as one function gamma -> ``Coefficients`` (alpha, sigma
and their gamma-derivatives; ``vp_coefficients``, ``sp_coefficients``), the only place
where they differ:

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
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  import ml_collections

# The truncated normal of docs/design.md, Dequantizations lives on [-tau, tau] with tau = alpha_0 /
# (sigma_0 V);
# the reference gamma_min makes tau = 3 (so 0.27% of a standard normal's mass is cut).
DEFAULT_TAU = 3.0

# A time gamma (or t): an array of any shape, or a Python number.
FloatLike: TypeAlias = jax.Array | float
_T = TypeVar("_T", jax.Array, float)


def default_gamma_min(num_levels: int, tau: float = DEFAULT_TAU) -> float:
  """gamma_min such that alpha/sigma at gamma_min equals tau * V (docs/design.md, Schedules).

  -2 log(tau V): -13.28 for V = 256, about -7.86 for V = 17. Valid for both schedules,
  since gamma = log(sigma^2 / alpha^2) by definition.
  """
  if num_levels < 2:
    raise ValueError(f"num_levels must be >= 2, got {num_levels}")
  return -2.0 * math.log(tau * num_levels)


def default_gamma_u(num_levels: int) -> float:
  """Start time of the ODE for uniform dequantization (docs/design.md, Dequantizations).

  The reference value is -11.8 for V = 256; for other bit depths the same relative
  noise level is -11.8 + 2 log(256 / V), which is gamma_min + 1.5 to within 0.02.
  """
  return -11.8 + 2.0 * math.log(256.0 / num_levels)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["alpha", "sigma", "dalpha", "dsigma", "dlog_alpha"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Coefficients:
  """alpha, sigma and their derivatives with respect to gamma, at one gamma (any shape).

  ``dlog_alpha`` = dalpha / alpha, written in closed form for each schedule (it is the
  linear coefficient of the ODE drift).
  """

  alpha: jax.Array
  sigma: jax.Array
  dalpha: jax.Array
  dsigma: jax.Array
  dlog_alpha: jax.Array


def vp_coefficients(gamma: FloatLike) -> Coefficients:
  """VP: sigma^2 = sigmoid(gamma), alpha^2 = sigmoid(-gamma)."""
  sigma = jnp.sqrt(jax.nn.sigmoid(gamma))
  alpha = jnp.sqrt(jax.nn.sigmoid(-gamma))
  return Coefficients(alpha=alpha, sigma=sigma, dalpha=-0.5 * alpha * sigma**2,
                      dsigma=0.5 * sigma * alpha**2, dlog_alpha=-0.5 * sigma**2)


def sp_coefficients(gamma: FloatLike) -> Coefficients:
  """SP: sigma = sigmoid(gamma / 2), alpha = 1 - sigma (written without cancellation)."""
  sigma = jax.nn.sigmoid(gamma / 2)
  alpha = jax.nn.sigmoid(-gamma / 2)
  return Coefficients(alpha=alpha, sigma=sigma, dalpha=-0.5 * sigma * alpha,
                      dsigma=0.5 * sigma * alpha, dlog_alpha=-0.5 * sigma)


# The one place where the schedules differ: name -> coefficients(gamma).
COEFFICIENT_FNS: dict[str, Callable[[FloatLike], Coefficients]] = {
    "VP": vp_coefficients,
    "SP": sp_coefficients,
}
SCHEDULES = tuple(COEFFICIENT_FNS)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A noise schedule on [gamma_min, gamma_max].

  ``coefficients(gamma)`` gives alpha, sigma and their derivatives together; the other
  functions are accessors of it. All take gamma (any shape) and broadcast elementwise.
  """

  name: str
  gamma_min: float
  gamma_max: float

  def __post_init__(self) -> None:
    if self.name not in COEFFICIENT_FNS:
      raise ValueError(f"unknown schedule {self.name!r}; expected one of {SCHEDULES}")
    self._check_range()

  def _check_range(self) -> None:
    if not self.gamma_min < self.gamma_max:
      raise ValueError(
          f"gamma_min ({self.gamma_min}) must be below gamma_max ({self.gamma_max})")

  @property
  def width(self) -> float:
    """gamma_max - gamma_min."""
    return self.gamma_max - self.gamma_min

  def gamma_from_t(self, t: _T) -> _T:
    """Maps t in [0, 1] linearly to gamma (t = 0 is the data end)."""
    return self.gamma_min + self.width * t

  def coefficients(self, gamma: FloatLike) -> Coefficients:
    """alpha, sigma, d alpha / d gamma, d sigma / d gamma and d log alpha / d gamma."""
    return COEFFICIENT_FNS[self.name](gamma)

  def sigma(self, gamma: FloatLike) -> jax.Array:
    return self.coefficients(gamma).sigma

  def alpha(self, gamma: FloatLike) -> jax.Array:
    return self.coefficients(gamma).alpha

  def dsigma(self, gamma: FloatLike) -> jax.Array:
    """d sigma / d gamma."""
    return self.coefficients(gamma).dsigma

  def dalpha(self, gamma: FloatLike) -> jax.Array:
    """d alpha / d gamma."""
    return self.coefficients(gamma).dalpha

  def dlog_alpha(self, gamma: FloatLike) -> jax.Array:
    """d log alpha / d gamma: the linear coefficient of the ODE drift."""
    return self.coefficients(gamma).dlog_alpha

  def drift_coefficients(self, gamma: FloatLike) -> tuple[jax.Array, jax.Array]:
    """(a, b) with dx/dgamma = a * x + b * eps_hat along the probability-flow ODE."""
    c = self.coefficients(gamma)
    return c.dlog_alpha, 0.5 * c.sigma

  def marginal(self, x: jax.Array, eps: jax.Array, gamma: FloatLike) -> jax.Array:
    """x_gamma = alpha x + sigma eps; gamma broadcasts against the leading axis of x."""
    c = self.coefficients(expand_like(gamma, x))
    return c.alpha * x + c.sigma * eps


def expand_like(gamma: FloatLike, x: jax.Array) -> jax.Array:
  """Reshapes a per-example gamma of shape (B,) to broadcast against x of shape (B, ...)."""
  gamma = jnp.asarray(gamma)
  if gamma.ndim == 0:
    return gamma
  return gamma.reshape(gamma.shape + (1,) * (x.ndim - gamma.ndim))


def make_schedule(config_model: ml_collections.ConfigDict) -> Schedule:
  """Builds the schedule of ``config.model`` (fields schedule, gamma_min, gamma_max)."""
  return Schedule(config_model.schedule, float(config_model.gamma_min),
                  float(config_model.gamma_max))
