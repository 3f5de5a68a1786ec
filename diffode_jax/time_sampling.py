"""Sampling the diffusion time gamma for the training loss (docs/design.md, Time sampling).

A sampler draws per-example gamma in [gamma_min, gamma_max] with density p(gamma) and
returns the importance weight 1 / p(gamma), so that for any integrand h

    integral h(gamma) dgamma = E_p[h(gamma) / p(gamma)].

* uniform: p = 1 / (gamma_max - gamma_min), weight = gamma_max - gamma_min.
* importance (velocity parameterization): p proportional to alpha(gamma)^2, the factor in
  front of ||F* - F||^2 in the likelihood weighting, so that factor cancels.
  VP has a closed-form inverse CDF; SP is inverted by bisection.

With ``antithetic`` the B uniforms of a batch are u_i = (u_0 + i / B) mod 1, one shared
random offset (stratified sampling, as in VDM).

Accuracy of the SP inverse: 64 bisection halvings of the interval, i.e. exact to the
floating-point resolution of the CDF. In float32 the CDF (about 11 in magnitude at the
reference gamma range) carries an absolute error near 1e-6, which moves gamma by at most
1e-6 / alpha(gamma)^2: below 2e-4 even at gamma_max = 5 (alpha^2 = 0.0058), and below 1e-5
for gamma < 0. The test compares it with a numerically integrated CDF.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from diffode_jax.schedules import FloatLike, Schedule

if TYPE_CHECKING:
  import ml_collections

_BISECTION_STEPS = 64


def alpha2_antiderivative(schedule: Schedule, gamma: FloatLike) -> jax.Array:
  """A closed-form antiderivative of alpha(gamma)^2.

  VP: alpha^2 = sigmoid(-g), antiderivative -softplus(-g).
  SP: alpha^2 = sigmoid(-g/2)^2, antiderivative g - 2 softplus(g/2) + 2 sigmoid(-g/2).
  """
  if schedule.name == "VP":
    return -jax.nn.softplus(-gamma)
  return gamma - 2.0 * jax.nn.softplus(gamma / 2) + 2.0 * jax.nn.sigmoid(-gamma / 2)


def alpha2_integral(schedule: Schedule) -> jax.Array:
  """Z, the integral of alpha^2 over [gamma_min, gamma_max]."""
  lo = jnp.asarray(schedule.gamma_min, dtype=float)
  hi = jnp.asarray(schedule.gamma_max, dtype=float)
  return alpha2_antiderivative(schedule, hi) - alpha2_antiderivative(schedule, lo)


@dataclasses.dataclass(frozen=True)
class TimeSampler:
  """Draws gamma for a batch; see the module docstring."""

  schedule: Schedule
  importance: bool = False
  antithetic: bool = True

  def uniforms(self, key: jax.Array, batch_size: int) -> jax.Array:
    if self.antithetic:
      u0 = jax.random.uniform(key, ())
      return jnp.mod(u0 + jnp.arange(batch_size) / batch_size, 1.0)
    return jax.random.uniform(key, (batch_size,))

  def cdf(self, gamma: jax.Array) -> jax.Array:
    """P(Gamma <= gamma)."""
    s = self.schedule
    if not self.importance:
      return (gamma - s.gamma_min) / s.width
    f = alpha2_antiderivative(s, gamma) - alpha2_antiderivative(s, jnp.asarray(s.gamma_min))
    return f / alpha2_integral(s)

  def inverse_cdf(self, u: jax.Array) -> jax.Array:
    """gamma with cdf(gamma) = u, for u in [0, 1]."""
    s = self.schedule
    if not self.importance:
      return s.gamma_from_t(u)
    z = alpha2_integral(s)
    if s.name == "VP":
      # softplus(-g) = softplus(-g_min) - u Z  =>  g = -log(expm1(softplus(-g_min) - u Z)).
      return -jnp.log(jnp.expm1(jax.nn.softplus(-jnp.asarray(s.gamma_min)) - u * z))
    return self._bisect(u)

  def _bisect(self, u: jax.Array) -> jax.Array:
    s = self.schedule
    lo = jnp.full_like(u, s.gamma_min)
    hi = jnp.full_like(u, s.gamma_max)

    def body(_: int | jax.Array, bounds: tuple[jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array]:
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      below = self.cdf(mid) < u
      return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (lo, hi))
    return 0.5 * (lo + hi)

  def density(self, gamma: jax.Array) -> jax.Array:
    """p(gamma) on [gamma_min, gamma_max]."""
    s = self.schedule
    if not self.importance:
      return jnp.full_like(jnp.asarray(gamma, dtype=float), 1.0 / s.width)
    return s.alpha(gamma) ** 2 / alpha2_integral(s)

  def sample(self, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Returns (gamma, weight) of shape (B,), weight = 1 / p(gamma)."""
    gamma = self.inverse_cdf(self.uniforms(key, batch_size))
    gamma = jnp.clip(gamma, self.schedule.gamma_min, self.schedule.gamma_max)
    return gamma, 1.0 / self.density(gamma)


def make_time_sampler(config: ml_collections.ConfigDict, schedule: Schedule) -> TimeSampler:
  importance = bool(config.training.importance_sampling)
  if importance and config.model.parameterization != "velocity":
    raise ValueError("importance sampling over time is defined for the velocity "
                     "parameterization only (set training.importance_sampling=False)")
  return TimeSampler(schedule, importance=importance,
                     antithetic=bool(config.training.antithetic_time))
