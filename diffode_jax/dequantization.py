"""From integer images to continuous states, and the log-density terms that go with them.

Integers k in {0, ..., V-1} map to bin centres x = (2k + 1) / V - 1 in (-1, 1); each bin
has half width 1 / V. docs/design.md (Dequantizations) defines three ways to turn the ODE's
continuous density into
a lower bound on the discrete probability P(k); each dequantizer returns the ODE start
state z0 at gamma0 and ``log_weight`` so that (natural logs, per example)

    log P(k) >= E[ log p_ODE(z0; gamma0) + log_weight ].

* ``tn`` (i-DODE): z0 = alpha_0 x + sigma_0 eps with eps ~ TN(0, I; [-tau, tau]),
  tau = alpha_0 / (sigma_0 V), so z0 stays inside the bin scaled by alpha_0;
  log_weight = -log q(z0).
* ``v`` (variational decoder): eps ~ N(0, I);
  log_weight = log p(k | z0) - log N(z0; alpha_0 x, sigma_0^2 I).
* ``u`` (uniform): x_c = 2 (k + u) / V - 1, u ~ U[0, 1)^D, z0 = alpha(gamma_u) x_c;
  log_weight = D log alpha(gamma_u) + D log(2 / V). The official code feeds x_c itself as
  the state; the D log alpha term is the exact change of variables to alpha x_c.

The same samplers serve training-time dequantization (``dequantize_for_training``).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from diffode_jax.decoder import decoder_log_likelihood
from diffode_jax.discretization import bin_centre, sum_per_example
from diffode_jax.schedules import Schedule

EVAL_DEQUANTIZATIONS = ("u", "v", "tn")
DEFAULT_EVAL_DEQUANTIZATION = "tn"  # the library's and configs/default.py's eval default
TRAIN_DEQUANTIZATIONS = ("none", "u", "tn")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def uniform_in_bin(key: jax.Array, k: jax.Array, num_levels: int) -> jax.Array:
  """x = 2 (k + u) / V - 1 with u ~ U[0, 1): uniform over the bin of k."""
  u = jax.random.uniform(key, k.shape)
  return 2.0 * (k.astype(jnp.float32) + u) / num_levels - 1.0


def truncation(schedule: Schedule, num_levels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(alpha_0, sigma_0, tau) at gamma_min; tau = alpha_0 / (sigma_0 V)."""
  c = schedule.coefficients(jnp.asarray(schedule.gamma_min, jnp.float32))
  alpha0, sigma0 = c.alpha, c.sigma
  return alpha0, sigma0, alpha0 / (sigma0 * num_levels)


def truncated_normal_log_norm(tau: jax.Array) -> jax.Array:
  """log of the normalizer sqrt(2 pi) * erf(tau / sqrt 2) of a TN on [-tau, tau]."""
  return _HALF_LOG_2PI + jnp.log(erf(tau / math.sqrt(2.0)))


def truncated_normal_second_moment(tau: jax.Array) -> jax.Array:
  """E[eps^2] for eps ~ TN(0, 1; [-tau, tau]): 1 - 2 tau phi(tau) / erf(tau / sqrt 2)."""
  phi = jnp.exp(-0.5 * tau**2 - _HALF_LOG_2PI)
  return 1.0 - 2.0 * tau * phi / erf(tau / math.sqrt(2.0))


@flax.struct.dataclass
class Dequantized:
  """z0: ODE start state; gamma0: its time (static); log_weight: per-example nats."""

  z0: jax.Array
  log_weight: jax.Array
  gamma0: float = flax.struct.field(pytree_node=False)


def dequantize(kind: str, key: jax.Array, k: jax.Array, schedule: Schedule, num_levels: int,
               gamma_u: float | None,
               analytic_entropy: bool = False) -> Dequantized:
  """Evaluation-time dequantization of a uint8/int batch k of shape (B, H, W, C).

  With ``analytic_entropy`` (``tn`` only) -log q is replaced by its expectation, the
  entropy of q; the bound's expectation is unchanged and its variance is lower, but it
  is valid only without importance weighting (K = 1).
  """
  dim = math.prod(k.shape[1:])
  if kind == "u":
    if gamma_u is None:
      raise ValueError("dequantization 'u' needs gamma_u (schedules.default_gamma_u(V))")
    g_u = jnp.asarray(gamma_u, jnp.float32)
    alpha_u = schedule.alpha(g_u)
    z0 = alpha_u * uniform_in_bin(key, k, num_levels)
    log_weight = dim * (jnp.log(alpha_u) + math.log(2.0 / num_levels))
    return Dequantized(z0, jnp.full((k.shape[0],), log_weight), float(gamma_u))

  x = bin_centre(k, num_levels)
  alpha0, sigma0, tau = truncation(schedule, num_levels)
  if kind == "tn":
    eps = jax.random.truncated_normal(key, -tau, tau, k.shape, jnp.float32)
    log_norm = dim * (jnp.log(sigma0) + truncated_normal_log_norm(tau))
    if analytic_entropy:
      neg_log_q = jnp.full((k.shape[0],), 0.5 * dim * truncated_normal_second_moment(tau))
    else:
      neg_log_q = 0.5 * sum_per_example(eps**2)
    return Dequantized(alpha0 * x + sigma0 * eps, neg_log_q + log_norm, schedule.gamma_min)
  if kind == "v":
    eps = jax.random.normal(key, k.shape, jnp.float32)
    z0 = alpha0 * x + sigma0 * eps
    neg_log_q = 0.5 * sum_per_example(eps**2) + dim * (jnp.log(sigma0) + _HALF_LOG_2PI)
    log_dec = decoder_log_likelihood(k, z0, schedule, num_levels)
    return Dequantized(z0, log_dec + neg_log_q, schedule.gamma_min)
  raise ValueError(
      f"unknown dequantization {kind!r}; expected one of {EVAL_DEQUANTIZATIONS}")


def dequantize_for_training(kind: str, key: jax.Array, k: jax.Array, schedule: Schedule,
                            num_levels: int) -> jax.Array:
  """Data x in (-1, 1) that the forward diffusion starts from during training.

  * ``none``: the bin centres (the i-DODE default);
  * ``u``: uniform over the bin (as ScoreFlow trained; the ``u`` of evaluation);
  * ``tn``: centre + (sigma_0 / alpha_0) eps, eps ~ TN(0, 1; [-tau, tau]): the evaluation
    distribution of ``tn`` mapped back to data space; it stays inside the bin.
  """
  if kind == "none":
    return bin_centre(k, num_levels)
  if kind == "u":
    return uniform_in_bin(key, k, num_levels)
  if kind == "tn":
    alpha0, sigma0, tau = truncation(schedule, num_levels)
    eps = jax.random.truncated_normal(key, -tau, tau, k.shape, jnp.float32)
    return bin_centre(k, num_levels) + (sigma0 / alpha0) * eps
  raise ValueError(
      f"unknown training dequantization {kind!r}; expected one of {TRAIN_DEQUANTIZATIONS}")
