"""The per-pixel decoder p(k | z_0) of VDM (docs/design.md, ELBO terms; ``decoder.py``):
normalization, the
inverse of the bin centres, the window of bins for large V against all V logits in float64
numpy, its samples against its probabilities, and the integer type of what it returns."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax.data import level_dtype
from diffode_jax.decoder import (decode_argmax, decode_sample, decoder_log_likelihood,
                                 window_size)
from diffode_jax.discretization import bin_centre, to_levels
from diffode_jax.schedules import Schedule, default_gamma_min


def decoder_log_probs(z0, schedule: Schedule, num_levels: int):
  """log p(j | z_0) for all V levels, from the formula of decoder.py's docstring (no
  window)."""
  gamma0 = jnp.asarray(schedule.gamma_min, z0.dtype)
  scaled, width = z0 / schedule.alpha(gamma0), jnp.exp(gamma0 / 2)
  centres = bin_centre(jnp.arange(num_levels), num_levels).astype(z0.dtype)
  return jax.nn.log_softmax(-0.5 * ((scaled[..., None] - centres) / width) ** 2, axis=-1)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_decoder_normalizes_and_inverts_bin_centres(levels):
  schedule = Schedule("VP", default_gamma_min(levels), 5.0)
  k = jnp.arange(levels).reshape(1, levels, 1, 1)
  alpha0 = schedule.alpha(jnp.float32(schedule.gamma_min))
  z0 = alpha0 * bin_centre(k, levels)
  log_probs_fn = jax.jit(decoder_log_probs, static_argnums=(1, 2))
  log_probs = np.asarray(log_probs_fn(z0, schedule, levels), np.float64)
  assert log_probs.shape == (1, levels, 1, 1, levels)
  np.testing.assert_allclose(np.log(np.exp(log_probs).sum(-1)), 0.0, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(log_probs, -1), k)
  np.testing.assert_array_equal(decode_argmax(z0, schedule, levels), k)
  # 0.99 half-widths right of centre j is nearly a tie between j and j + 1, j ahead
  shifted = alpha0 * (bin_centre(k[:, :-1], levels) + 0.99 / levels)
  lp = np.asarray(log_probs_fn(shifted, schedule, levels))[0, :, 0, 0]
  j = np.arange(levels - 1)
  assert np.all(lp[j, j] > lp[j, j + 1])
  assert np.all(lp[j, j] - lp[j, j + 1] < 0.2)
  # the per-example log-likelihood picks and sums the entries of the true levels
  ll = jax.jit(decoder_log_likelihood, static_argnums=(2, 3))(k[:, :-1], shifted, schedule,
                                                             levels)
  np.testing.assert_allclose(ll, [lp[j, j].sum()], rtol=1e-5)
  assert float(ll[0]) < -0.5 * (levels - 1)  # near-ties: about log(1/2) per pixel


def _full_decoder_log_probs(z0, gamma_min, levels):
  """All V normalized log-probabilities in float64 numpy (decoder logits of docs/design.md, no
  window)."""
  c = math.exp(gamma_min / 2)  # sigma_0 / alpha_0
  alpha0 = math.sqrt(1 / (1 + math.exp(gamma_min)))  # VP
  centres = (2 * np.arange(levels) + 1) / levels - 1
  logits = -0.5 * ((np.asarray(z0, np.float64)[..., None] / alpha0 - centres) / c) ** 2
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("levels,gamma_min", [(4096, None), (65536, None), (4096, -13.0)])
def test_windowed_decoder_matches_the_full_normalization(levels, gamma_min):
  # 12- and 16-bit data: the decoder scores a window of bins, not all V.
  gamma_min = default_gamma_min(levels) if gamma_min is None else gamma_min
  schedule = Schedule("VP", gamma_min, 5.0)
  n = window_size(schedule, levels)
  assert n % 2 == 1 and n < levels
  rng = np.random.default_rng(0)
  k = rng.integers(0, levels, size=(6, 3, 2, 1))
  k[0, 0, 0, 0], k[0, 0, 1, 0] = 0, levels - 1  # the edges
  alpha0 = float(schedule.alpha(jnp.float32(gamma_min)))
  # z0 near its own bin, between bins, and beyond the data range (window at the edge)
  offsets = rng.normal(size=k.shape) * math.exp(gamma_min / 2) * 2
  x = (2 * k + 1) / levels - 1 + offsets
  x[1, 0, 0, 0], x[1, 0, 1, 0] = -1.2, 1.3
  z0 = jnp.asarray(alpha0 * x, jnp.float32)
  full = _full_decoder_log_probs(z0, gamma_min, levels)
  want = np.take_along_axis(full, k[..., None], -1)[..., 0].reshape(6, -1).sum(-1)
  ll = jax.jit(decoder_log_likelihood, static_argnums=(2, 3))(jnp.asarray(k), z0, schedule,
                                                             levels)
  np.testing.assert_allclose(ll, want, rtol=2e-4, atol=2e-3)
  # a level far outside the window keeps its (very negative) exact log-probability
  far = (k + levels // 2) % levels
  far_want = np.take_along_axis(full, far[..., None], -1)[..., 0].reshape(6, -1).sum(-1)
  far_ll = decoder_log_likelihood(jnp.asarray(far), z0, schedule, levels)
  np.testing.assert_allclose(far_ll, far_want, rtol=1e-4)
  np.testing.assert_array_equal(decode_argmax(z0, schedule, levels), full.argmax(-1))


def test_windowed_decoder_samples_follow_the_decoder_probabilities():
  levels, gamma_min = 4096, -13.0  # about 1.5 bins per standard deviation
  schedule = Schedule("VP", gamma_min, 5.0)
  alpha0 = float(schedule.alpha(jnp.float32(gamma_min)))
  x = (2 * 2000 + 1) / levels - 1 + 0.4 / levels  # between bins 2000 and 2001
  z0 = jnp.full((40000,), alpha0 * x, jnp.float32)
  draws = np.asarray(decode_sample(jax.random.PRNGKey(0), z0, schedule, levels))
  probs = np.exp(_full_decoder_log_probs(np.float32(alpha0 * x), gamma_min, levels))
  for level in range(1996, 2006):
    freq = np.mean(draws == level)
    # binomial standard error; 5 of them
    assert abs(freq - probs[level]) < 5 * math.sqrt(probs[level] * (1 - probs[level]) / 40000
                                                    ) + 1e-4, level


@pytest.mark.parametrize("levels", [17, 256, 4096, 65536])
def test_decoded_levels_have_the_data_dtype(levels):
  """argmax, sample and round all return data.level_dtype(V), the type the data loads."""
  schedule = Schedule("VP", default_gamma_min(levels), 5.0)
  k = np.linspace(0, levels - 1, 12).round().astype(np.int64).reshape(1, 3, 4, 1)
  alpha0 = schedule.alpha(jnp.float32(schedule.gamma_min))
  z0 = alpha0 * bin_centre(k, levels)
  want = np.dtype(level_dtype(levels))
  drawn = decode_sample(jax.random.PRNGKey(0), z0, schedule, levels)
  assert drawn.dtype == want
  for got in (decode_argmax(z0, schedule, levels), to_levels(z0 / alpha0, levels)):
    assert got.dtype == want
    np.testing.assert_array_equal(np.asarray(got, np.int64), k)
