"""The factorized per-pixel decoder p(k | z_0) of VDM (docs/design.md, ELBO terms and the decoder).

At gamma_0 = gamma_min the state z_0 = alpha_0 x + sigma_0 eps is nearly noise-free. The
decoder scores each of the V bin centres x_j by a Gaussian around z_0 / alpha_0 with
standard deviation sigma_0 / alpha_0 = exp(gamma_min / 2):

    logits_j = -0.5 * ((z_0 / alpha_0 - x_j) / exp(gamma_min / 2))^2,

normalized over j. Log-probabilities are natural logs.

All V logits per pixel are needed only when that Gaussian spans many bins. At the default
gamma_min its standard deviation is 1 / (2 tau) = 1/6 of a bin, so for large V (16-bit
data: V = 65536, which would need 65536 logits per pixel) the normalizer is taken over a
window of bins around the one nearest to z_0 / alpha_0, wide enough (``WINDOW_SIGMAS``
standard deviations each way) that the mass outside it is below exp(-WINDOW_SIGMAS^2 / 2),
far below float32 resolution. Where the window would cover every bin, all V are used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffode_jax.data import level_dtype
from diffode_jax.discretization import bin_centre, sum_per_example
from diffode_jax.schedules import Schedule

WINDOW_SIGMAS = 14.0


def _scaled_and_width(z0: jax.Array, schedule: Schedule) -> tuple[jax.Array, jax.Array]:
  gamma0 = jnp.asarray(schedule.gamma_min, z0.dtype)
  return z0 / schedule.alpha(gamma0), jnp.exp(gamma0 / 2)


def window_size(schedule: Schedule, num_levels: int) -> int:
  """Bins scored per pixel: V, or an odd window when the decoder is much narrower."""
  sd_bins = math.exp(schedule.gamma_min / 2) * num_levels / 2  # sd over the bin width 2/V
  half = math.ceil(WINDOW_SIGMAS * sd_bins) + 1
  return min(num_levels, 2 * half + 1)


def decoder_logits(z0: jax.Array, schedule: Schedule,
                   num_levels: int) -> tuple[jax.Array, jax.Array]:
  """(levels, unnormalized logits) of the bins scored for each pixel, each z0.shape + (n,).

  n = window_size(schedule, V); with n = V the levels are 0..V-1 for every pixel.
  """
  scaled, width = _scaled_and_width(z0, schedule)
  n = window_size(schedule, num_levels)
  if n == num_levels:
    levels = jnp.broadcast_to(jnp.arange(num_levels), z0.shape + (num_levels,))
  else:
    nearest = jnp.floor((scaled + 1.0) * num_levels / 2.0).astype(jnp.int32)
    start = jnp.clip(nearest - n // 2, 0, num_levels - n)
    levels = start[..., None] + jnp.arange(n)
  centres = bin_centre(levels, num_levels).astype(z0.dtype)
  return levels, -0.5 * ((scaled[..., None] - centres) / width) ** 2


def decoder_log_likelihood(k: jax.Array, z0: jax.Array, schedule: Schedule,
                           num_levels: int) -> jax.Array:
  """sum over pixels of log p(k | z_0), per example (leading axis)."""
  _, logits = decoder_logits(z0, schedule, num_levels)
  scaled, width = _scaled_and_width(z0, schedule)
  # The logit of k itself, from the formula: k may lie outside the window.
  logit_k = -0.5 * ((scaled - bin_centre(k, num_levels).astype(z0.dtype)) / width) ** 2
  picked = logit_k - jax.nn.logsumexp(logits, axis=-1)
  return sum_per_example(picked)


def decode_argmax(z0: jax.Array, schedule: Schedule, num_levels: int) -> jax.Array:
  """The most likely integer image under the decoder, as ``data.level_dtype(V)``."""
  levels, logits = decoder_logits(z0, schedule, num_levels)
  best = jnp.take_along_axis(levels, jnp.argmax(logits, axis=-1)[..., None], axis=-1)
  return best[..., 0].astype(level_dtype(num_levels))


def decode_sample(key: jax.Array, z0: jax.Array, schedule: Schedule,
                  num_levels: int) -> jax.Array:
  """Integer images drawn from the decoder, as ``data.level_dtype(V)``."""
  levels, logits = decoder_logits(z0, schedule, num_levels)
  pick = jax.random.categorical(key, logits, axis=-1)
  best = jnp.take_along_axis(levels, pick[..., None], axis=-1)
  return best[..., 0].astype(level_dtype(num_levels))
