"""The VDM-style U-Net without downsampling (docs/design.md, Architecture).

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

Layout switches; the defaults are this project's original layout, the alternatives are
the layout of the official i-DODE code (``model_vdm.py`` of thu-ml/i-DODE), which the
reference configs use so that released checkpoints load exactly:

* ``block_attention``: a self-attention block after every down and up ResNet block
  (official ``with_attention``; on in the augmented CIFAR-10 model).
* ``cond_input``: ``"onehot"`` adds a Dense projection of an optional (B, K) conditioning
  vector to the sinusoidal embedding; ``"scalar"`` concatenates one scalar per example
  (B,) to it before the first dense layer (official; 0 unless the training image was
  augmented), so that layer has ``channels + 1`` inputs.
* ``time_proj``: the ResNet blocks' projection of the time embedding, ``"with_bias"`` (a Dense with
  bias, default initializer) or ``"zero_no_bias"`` (official: no bias, zero-initialized).
* ``time_embedding``: ``"native"`` or ``"official"`` floating-point order of the
  sinusoidal frequencies. They differ by about 1e-6 relatively, which 1000 * t turns into
  up to ~1e-4 in the embedding; ``"official"`` reproduces the official numbers to float32
  rounding.

With ``remat`` every ResNet block is rematerialized in the backward pass (``nn.remat``):
only its inputs are kept for the gradient and its activations are recomputed, which
trades about a third more compute for the memory of the activations. The blocks keep
their parameter names either way, so checkpoints do not depend on it.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import jax

import flax.linen as nn
import jax.numpy as jnp

_zeros = nn.initializers.zeros


TIME_EMBEDDINGS = ("native", "official")
COND_INPUTS = ("onehot", "scalar")
TIME_PROJS = ("with_bias", "zero_no_bias")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       order: str = "native") -> jax.Array:
  """Sinusoidal embedding of a (B,) array of times (any scale) into (B, dim).

  ``order`` "official" computes the frequencies as exp(k * -(log(max_period) / (half - 1)))
  with the constant in float64, the operation order of the official code.
  """
  half = dim // 2
  if order == "official":
    rate = math.log(max_period) / max(half - 1, 1)
    freqs = jnp.exp(jnp.arange(half, dtype=t.dtype) * -rate)
  else:
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half) / max(half - 1, 1))
  args = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_features(x: jax.Array, n_min: int, n_max: int) -> jax.Array:
  """sin and cos of 2^n * 2 pi * x for n in [n_min, n_max], stacked on the channel axis."""
  freqs = 2.0 ** jnp.arange(n_min, n_max + 1) * 2.0 * jnp.pi
  h = (x[..., None] * freqs).reshape(x.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def _groups(num_groups: int, channels: int) -> int:
  return math.gcd(num_groups, channels)


def time_norm_group_size(channels: int, num_groups: int) -> int:
  """Channels per group of the GroupNorm that follows the time embedding in a ResNet block.

  The time embedding (with the conditioning input folded into it) reaches the network
  only as a per-channel constant added to the block's first convolution, right before
  this GroupNorm. GroupNorm subtracts each group's mean over the spatial positions and
  the group's channels: with one channel per group that mean is the constant itself, so
  the network's output no longer depends on the noise level. Every ResNet block has
  ``channels`` output channels, so this one number decides it for the whole network.
  """
  return channels // _groups(num_groups, channels)


def time_blind_reason(channels: int, num_groups: int) -> Optional[str]:
  """None if the U-Net sees the noise level (and the conditioning), else one line why not
  with a layout that works."""
  if time_norm_group_size(channels, num_groups) >= 2:
    return None
  if channels < 2:
    fix = "use model.channels >= 2 (e.g. model.channels=8 with model.num_groups=2)"
  else:  # the most groups that leave at least 4 channels each (2 for channels < 4)
    least = 4 if channels >= 4 else 2
    groups = max(g for g in range(1, channels + 1)
                 if channels % g == 0 and channels // g >= least)
    fix = f"use model.num_groups={groups} ({channels // groups} channels per group)"
  return (f"model.channels={channels} with model.num_groups={num_groups} puts one channel "
          f"in each GroupNorm group, which removes the time embedding (and the "
          f"conditioning input) that every ResNet block adds right before it: the network "
          f"cannot see the noise level; {fix}")


class ResnetBlock(nn.Module):
  channels: int
  dropout: float
  num_groups: int
  time_proj: str = "with_bias"

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.swish(nn.GroupNorm(_groups(self.num_groups, x.shape[-1]))(x))
    h = nn.Conv(self.channels, (3, 3))(h)
    if self.time_proj == "zero_no_bias":
      proj = nn.Dense(self.channels, use_bias=False, kernel_init=_zeros)
    else:
      proj = nn.Dense(self.channels)
    h = h + proj(temb)[:, None, None, :]
    # time_blind_reason relies on this: time enters only here, before this GroupNorm.
    groups = self.channels // time_norm_group_size(self.channels, self.num_groups)
    h = nn.swish(nn.GroupNorm(groups)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.channels, (3, 3), kernel_init=_zeros)(h)
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the spatial positions, residual."""

  num_groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(_groups(self.num_groups, c))(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c)(h) for _ in range(3))
    weights = nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c), axis=-1)
    h = jnp.einsum("bij,bjc->bic", weights, v)
    h = nn.Dense(c, kernel_init=_zeros)(h)
    return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  """See the module docstring.

  ``cond``: with ``cond_input`` "onehot" an optional (B, K) vector (e.g. the augmentation
  one-hot); with "scalar" a (B,) array (None means zeros).
  """

  channels: int = 128
  num_blocks: int = 32
  embed_dim: int = 512
  attention: bool = True
  block_attention: bool = False
  cond_input: str = "onehot"
  time_proj: str = "with_bias"
  time_embedding: str = "native"
  dropout: float = 0.1
  num_groups: int = 32
  fourier_min: int = 6
  fourier_max: int = 7
  fourier: bool = True
  base_measure_skip: bool = True
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, gamma: jax.Array | float, train: bool = False,
               cond: Optional[jax.Array] = None) -> jax.Array:
    batch = x.shape[0]
    gamma = jnp.broadcast_to(jnp.asarray(gamma, x.dtype), (batch,))
    t = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    temb = timestep_embedding(1000.0 * t, self.channels, order=self.time_embedding)
    if self.cond_input == "scalar":
      c = jnp.zeros((batch,), x.dtype) if cond is None else jnp.reshape(cond, (batch,))
      temb = jnp.concatenate([temb, c.astype(x.dtype)[:, None]], axis=-1)
    elif cond is not None:
      temb = temb + nn.Dense(self.channels)(cond.astype(x.dtype))
    temb = nn.swish(nn.Dense(self.embed_dim)(temb))
    temb = nn.swish(nn.Dense(self.embed_dim)(temb))

    h = x
    if self.fourier:
      h = jnp.concatenate([x, fourier_features(x, self.fourier_min, self.fourier_max)], -1)
    h = nn.Conv(self.channels, (3, 3))(h)

    # Named as flax names them without remat (nn.remat's class would be
    # "CheckpointResnetBlock_i"), so that both share one parameter tree.
    block_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
    index = itertools.count()
    block = lambda: block_cls(self.channels, self.dropout, self.num_groups, self.time_proj,
                              name=f"ResnetBlock_{next(index)}")
    attend = lambda h: AttentionBlock(self.num_groups)(h)
    skips = [h]
    for _ in range(self.num_blocks):
      h = block()(h, temb, train)
      if self.block_attention:
        h = attend(h)
      skips.append(h)

    h = block()(h, temb, train)
    if self.attention:
      h = attend(h)
    h = block()(h, temb, train)

    for _ in range(self.num_blocks + 1):
      h = block()(jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
      if self.block_attention:
        h = attend(h)

    h = nn.swish(nn.GroupNorm(_groups(self.num_groups, self.channels))(h))
    out = nn.Conv(x.shape[-1], (3, 3), kernel_init=_zeros)(h)
    if self.base_measure_skip:
      out = out + x
    return out
