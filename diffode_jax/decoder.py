"""The factorized per-pixel decoder p(k | z_0) of VDM (SPEC 4).

At gamma_0 = gamma_min the state z_0 = alpha_0 x + sigma_0 eps is nearly noise-free. The
decoder scores each of the V bin centres x_j by a Gaussian around z_0 / alpha_0 with
standard deviation sigma_0 / alpha_0 = exp(gamma_min / 2):

    logits_j = -0.5 * ((z_0 / alpha_0 - x_j) / exp(gamma_min / 2))^2,

normalized over j. Log-probabilities are natural logs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffode_jax.discretization import bin_centre
from diffode_jax.schedules import Schedule


def decoder_log_probs(z0, schedule: Schedule, num_levels: int):
  """log p(j | z_0) for every level j; shape z0.shape + (V,)."""
  gamma0 = jnp.asarray(schedule.gamma_min, z0.dtype)
  scaled = z0 / schedule.alpha(gamma0)
  centres = bin_centre(jnp.arange(num_levels), num_levels).astype(z0.dtype)
  logits = -0.5 * ((scaled[..., None] - centres) / jnp.exp(gamma0 / 2)) ** 2
  return jax.nn.log_softmax(logits, axis=-1)


def decoder_log_likelihood(k, z0, schedule: Schedule, num_levels: int):
  """sum over pixels of log p(k | z_0), per example (leading axis)."""
  log_probs = decoder_log_probs(z0, schedule, num_levels)
  picked = jnp.take_along_axis(log_probs, k.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  return picked.reshape(k.shape[0], -1).sum(axis=-1)


def decode_argmax(z0, schedule: Schedule, num_levels: int):
  """The most likely integer image under the decoder (uint8 for V <= 256, else int32)."""
  levels = jnp.argmax(decoder_log_probs(z0, schedule, num_levels), axis=-1)
  return levels.astype(jnp.uint8 if num_levels <= 256 else jnp.int32)
