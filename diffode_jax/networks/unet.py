"""The VDM-style U-Net without downsampling (SPEC 7).

The network knows nothing of diffusion: it maps an image x of shape (B, H, W, C) and a
per-example noise level gamma of shape (B,) (or a scalar) to a raw output of x's shape.
``gamma_min`` / ``gamma_max`` only normalize the time input to [0, 1].

Architecture: Fourier features of the input (sin/cos at frequencies 2^n * 2 pi for n in
[fourier_min, fourier_max]) concatenated with x; a 3x3 conv to ``channels``;
``num_blocks`` ResNet blocks; a middle ResNet - self-attention - ResNet block; and
``num_blocks + 1`` ResNet blocks that each take the skip of the matching down block;
GroupNorm + swish + a zero-initialized 3x3 conv to the output. The time embedding is a
sinusoidal embedding of 1000 * normalized gamma followed by two dense layers of width
``embed_dim``. With ``base_measure_skip`` the input is added to the output (VDM).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

_zeros = nn.initializers.zeros


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of a (B,) array of times (any scale) into (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half) / max(half - 1, 1))
  args = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_features(x, n_min: int, n_max: int):
  """sin and cos of 2^n * 2 pi * x for n in [n_min, n_max], stacked on the channel axis."""
  freqs = 2.0 ** jnp.arange(n_min, n_max + 1) * 2.0 * jnp.pi
  h = (x[..., None] * freqs).reshape(x.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def _groups(num_groups: int, channels: int) -> int:
  return math.gcd(num_groups, channels)


class ResnetBlock(nn.Module):
  channels: int
  dropout: float
  num_groups: int

  @nn.compact
  def __call__(self, x, temb, train: bool):
    h = nn.swish(nn.GroupNorm(_groups(self.num_groups, x.shape[-1]))(x))
    h = nn.Conv(self.channels, (3, 3))(h)
    h = h + nn.Dense(self.channels)(temb)[:, None, None, :]
    h = nn.swish(nn.GroupNorm(_groups(self.num_groups, self.channels))(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.channels, (3, 3), kernel_init=_zeros)(h)
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the spatial positions, residual."""

  num_groups: int

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(_groups(self.num_groups, c))(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c)(h) for _ in range(3))
    weights = nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c), axis=-1)
    h = jnp.einsum("bij,bjc->bic", weights, v)
    h = nn.Dense(c, kernel_init=_zeros)(h)
    return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  """See the module docstring. ``cond`` (B, K) optional conditioning (e.g. augmentation)."""

  channels: int = 128
  num_blocks: int = 32
  embed_dim: int = 512
  attention: bool = True
  dropout: float = 0.1
  num_groups: int = 32
  fourier_min: int = 6
  fourier_max: int = 7
  fourier: bool = True
  base_measure_skip: bool = True
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, x, gamma, train: bool = False, cond: Optional[jnp.ndarray] = None):
    batch = x.shape[0]
    gamma = jnp.broadcast_to(jnp.asarray(gamma, x.dtype), (batch,))
    t = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    temb = timestep_embedding(1000.0 * t, self.channels)
    if cond is not None:
      temb = temb + nn.Dense(self.channels)(cond.astype(x.dtype))
    temb = nn.swish(nn.Dense(self.embed_dim)(temb))
    temb = nn.swish(nn.Dense(self.embed_dim)(temb))

    h = x
    if self.fourier:
      h = jnp.concatenate([x, fourier_features(x, self.fourier_min, self.fourier_max)], -1)
    h = nn.Conv(self.channels, (3, 3))(h)

    block = lambda: ResnetBlock(self.channels, self.dropout, self.num_groups)
    skips = [h]
    for _ in range(self.num_blocks):
      h = block()(h, temb, train)
      skips.append(h)

    h = block()(h, temb, train)
    if self.attention:
      h = AttentionBlock(self.num_groups)(h)
    h = block()(h, temb, train)

    for _ in range(self.num_blocks + 1):
      h = block()(jnp.concatenate([h, skips.pop()], axis=-1), temb, train)

    h = nn.swish(nn.GroupNorm(_groups(self.num_groups, self.channels))(h))
    out = nn.Conv(x.shape[-1], (3, 3), kernel_init=_zeros)(h)
    if self.base_measure_skip:
      out = out + x
    return out
