"""Integer images and their bins in x-space (docs/design.md, Data and discretization).

Images are integers k in {0, ..., V-1}; the model sees bin centres scaled to (-1, 1):
x = (2k + 1) / V - 1. Each bin has width 2 / V. bits/dim = -log2 P(k) / D, where D is the
number of dimensions of one example: the per-example sums of the library
(``sum_per_example``) run over every axis but the leading (batch) one.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffode_jax.data import level_dtype


def bin_centre(k, num_levels: int):
  """x = (2k + 1) / V - 1 as float32."""
  return (2.0 * jnp.asarray(k).astype(jnp.float32) + 1.0) / num_levels - 1.0


def sum_per_example(a):
  """Sum over every axis but the leading (batch) one: shape (B, ...) -> (B,)."""
  return a.reshape(a.shape[0], -1).sum(axis=-1)


def nats_to_bpd(nats, dim: int):
  """Converts a negative log-likelihood in nats per example to bits per dimension."""
  return nats / (dim * math.log(2.0))


def to_levels(x, num_levels: int):
  """Rounds continuous x in [-1, 1] to the nearest level k (the inverse of bin_centre).

  The levels have the data's integer type, ``data.level_dtype(V)``.
  """
  k = jnp.floor((x + 1.0) * num_levels / 2.0)
  k = jnp.clip(k, 0, num_levels - 1)
  return k.astype(level_dtype(num_levels))
