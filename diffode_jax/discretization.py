"""Integer images and their bins in x-space (docs/design.md, Data and discretization).

Images are integers k in {0, ..., V-1}; the model sees bin centres scaled to (-1, 1):
x = (2k + 1) / V - 1. Each bin has width 2 / V. bits/dim = -log2 P(k) / D, where D is the
number of dimensions of one example: the per-example sums of the library
(``sum_per_example``) run over every axis but the leading (batch) one.
"""

from __future__ import annotations

import math
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffode_jax.data import level_dtype

_T = TypeVar("_T", jax.Array, np.ndarray, float)


def bin_centre(k: ArrayLike, num_levels: int) -> jax.Array:
  """x = (2k + 1) / V - 1 as float32."""
  return (2.0 * jnp.asarray(k).astype(jnp.float32) + 1.0) / num_levels - 1.0


def sum_per_example(a: jax.Array) -> jax.Array:
  """Sum over every axis but the leading (batch) one: shape (B, ...) -> (B,)."""
  return a.reshape(a.shape[0], -1).sum(axis=-1)


def nats_to_bpd(nats: _T, dim: int) -> _T:
  """Converts a negative log-likelihood in nats per example to bits per dimension."""
  return nats / (dim * math.log(2.0))


def to_levels(x: jax.Array, num_levels: int) -> jax.Array:
  """Rounds continuous x in [-1, 1] to the nearest level k (the inverse of bin_centre).

  The levels have the data's integer type, ``data.level_dtype(V)``.
  """
  k = jnp.floor((x + 1.0) * num_levels / 2.0)
  k = jnp.clip(k, 0, num_levels - 1)
  return k.astype(level_dtype(num_levels))
