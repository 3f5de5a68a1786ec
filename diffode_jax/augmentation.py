"""Data augmentation by the 8 symmetries of the square, passed to the network as conditioning.

Index a in {0, ..., 7} = 4 * flip + rotation: a horizontal flip (``flip`` = 1) followed by
``rotation`` counter-clockwise quarter turns. Index 0 is the identity. The network is told
which symmetry was applied through a one-hot ``cond`` of shape (B, 8), so it learns the
density of each transformed data set separately and the identity-conditioned model
(evaluation and sampling) stays a model of the untransformed images, as in the
augmented CIFAR-10 run of the paper. With ``model.cond_input = "scalar"`` the network is
told only whether the image was transformed (``transformed_flag``), as in the official
code; its symmetries are drawn differently there (identity 1/4, see README), here
uniformly.

Augmentation acts on the integer images before dequantization, inside the jitted train
step; the indices are drawn from the step key, so a resumed run sees the same
augmentations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_AUGMENTATIONS = 8
IDENTITY = 0


def transform(k: jax.Array, index: int) -> jax.Array:
  """The symmetry ``index`` applied to a batch (B, H, W, C) with H == W."""
  flip, rotation = divmod(index, 4)
  if flip:
    k = k[:, :, ::-1, :]
  return jnp.rot90(k, rotation, axes=(1, 2))


def one_hot(indices: jax.Array) -> jax.Array:
  """Conditioning vector (B, NUM_AUGMENTATIONS) of the symmetry indices (B,)."""
  return jax.nn.one_hot(indices, NUM_AUGMENTATIONS, dtype=jnp.float32)


def identity_cond(batch: int) -> jax.Array:
  """The conditioning of untransformed images: evaluation and sampling use this."""
  return one_hot(jnp.full((batch,), IDENTITY, jnp.int32))


def transformed_flag(cond: jax.Array) -> jax.Array:
  """The official i-DODE conditioning of a (B, NUM_AUGMENTATIONS) one-hot: 1.0 where the
  image was transformed (any symmetry but the identity), 0.0 where it was not."""
  return 1.0 - cond[:, IDENTITY]


def augment(key: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(transformed batch, cond): one uniformly drawn symmetry per example."""
  if k.shape[1] != k.shape[2]:
    raise ValueError(f"augmentation by quarter turns needs square images, got {k.shape[1:3]}")
  indices = jax.random.randint(key, (k.shape[0],), 0, NUM_AUGMENTATIONS)
  candidates = jnp.stack([transform(k, a) for a in range(NUM_AUGMENTATIONS)])  # (8, B, ...)
  chosen = jnp.take_along_axis(
      candidates, indices.reshape((1, -1) + (1,) * (k.ndim - 1)), axis=0)[0]
  return chosen, one_hot(indices)
