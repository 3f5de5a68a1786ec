"""The closed-form network of a finite training set: a model with a known answer (docs/design.md,
The oracle).

For data x_1..x_N (bin centres in (-1, 1)) drawn uniformly, the marginal at gamma is the
Gaussian mixture

    p_gamma(x_g) = (1/N) sum_i N(x_g; alpha x_i, sigma^2 I),

and the posterior over which training point produced x_g has the softmax weights

    w_i(x_g) = softmax_i( -||x_g - alpha x_i||^2 / (2 sigma^2) ).

The minimizer of every regression loss of docs/design.md, Losses is the posterior mean of its
target.
Targets are linear in (x, eps), so the oracle output is the target evaluated at the
posterior means

    x_hat   = sum_i w_i x_i,
    eps_hat = sum_i w_i (x_g - alpha x_i) / sigma          (Tweedie: -sigma grad log p),

i.e. F = ``Parameterization.target(x_hat, eps_hat, gamma)``: eps for the noise
parameterization, alpha eps - sigma x (VP) or (eps - x) / sqrt 2 (SP) for velocity. Put in
place of the network, ``Components.drift`` is then the exact probability-flow drift.

Numerics: squared distances come from the differences x_g - alpha x_i themselves (not
from ||x_g||^2 - 2 alpha x_g.x_i + alpha^2 ||x_i||^2, which cancels catastrophically at
small sigma), eps_hat is averaged from those same differences, and the softmax is a
streaming log-sum-exp over chunks of the training set (``lax.scan``), so memory is
O(batch * chunk * D) for any N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy.typing as npt

from diffode_jax.discretization import bin_centre
from diffode_jax.parameterization import Parameterization
from diffode_jax.schedules import FloatLike

if TYPE_CHECKING:
  from diffode_jax.losses import NetFn

# Upper bound on the elements of one (batch, chunk, D) block of differences.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


def _chunk_size(batch: int, num_train: int, dim: int, block_elements: int) -> int:
  return max(1, min(num_train, block_elements // max(batch * dim, 1)))


def posterior_means(train_x: jax.Array, x_gamma: jax.Array, alpha: jax.Array, sigma: jax.Array,
                    block_elements: int = DEFAULT_BLOCK_ELEMENTS
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x_hat, eps_hat, log_mixture) of the empirical distribution of train_x at x_gamma.

  Args:
    train_x: (N, ...) training points in data space.
    x_gamma: (B, ...) noisy states, same trailing shape.
    alpha, sigma: (B,) schedule values of each state.
    block_elements: memory bound on one (B, chunk, D) block of differences.

  Returns:
    x_hat (B, ...) = E[x | x_gamma], eps_hat (B, ...) = E[eps | x_gamma], and
    log_mixture (B,) = log p_gamma(x_gamma) in nats (an independent check via its gradient:
    grad log p = -eps_hat / sigma).
  """
  num_train = train_x.shape[0]
  batch = x_gamma.shape[0]
  dim = math.prod(x_gamma.shape[1:])
  xs = train_x.reshape(num_train, dim).astype(x_gamma.dtype)
  xg = x_gamma.reshape(batch, dim)
  chunk = _chunk_size(batch, num_train, dim, block_elements)
  num_chunks = -(-num_train // chunk)
  pad = num_chunks * chunk - num_train
  valid = jnp.arange(num_chunks * chunk) < num_train
  xs = jnp.pad(xs, ((0, pad), (0, 0))).reshape(num_chunks, chunk, dim)
  valid = valid.reshape(num_chunks, chunk)
  a = alpha[:, None, None]
  inv_two_var = 0.5 / sigma**2

  def accumulate(carry: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
                 block: tuple[jax.Array, jax.Array]
                 ) -> tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], None]:
    top, total, sum_x, sum_d = carry
    x_chunk, ok = block
    diff = xg[:, None, :] - a * x_chunk[None]  # (B, chunk, D)
    logits = -(diff**2).sum(-1) * inv_two_var[:, None]
    logits = jnp.where(ok[None], logits, -jnp.inf)
    # The shift cancels exactly, so it carries no derivative.
    new_top = jax.lax.stop_gradient(jnp.maximum(top, logits.max(axis=1)))
    rescale = jnp.exp(top - new_top)
    p = jnp.exp(logits - new_top[:, None])  # (B, chunk)
    total = total * rescale + p.sum(axis=1)
    sum_x = sum_x * rescale[:, None] + p @ x_chunk
    sum_d = sum_d * rescale[:, None] + jnp.einsum("bn,bnd->bd", p, diff)
    return (new_top, total, sum_x, sum_d), None

  init = (jnp.full((batch,), -jnp.inf, xg.dtype), jnp.zeros((batch,), xg.dtype),
          jnp.zeros((batch, dim), xg.dtype), jnp.zeros((batch, dim), xg.dtype))
  (top, total, sum_x, sum_d), _ = jax.lax.scan(accumulate, init, (xs, valid))
  x_hat = (sum_x / total[:, None]).reshape(x_gamma.shape)
  eps_hat = (sum_d / (total * sigma)[:, None]).reshape(x_gamma.shape)
  log_mixture = (top + jnp.log(total) - math.log(num_train)
                 - dim * (jnp.log(sigma) + 0.5 * math.log(2.0 * math.pi)))
  return x_hat, eps_hat, log_mixture


def oracle_net(train_images: npt.ArrayLike, num_levels: int, parameterization: Parameterization,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS
               ) -> tuple[Callable[[jax.Array | None], jax.Array], NetFn]:
  """(init_params, net_fn) of the exact network for the training images (integers < V).

  ``init_params(key)`` ignores the key and returns the bin centres (N, H, W, C) float32;
  ``net_fn(params, x_gamma, gamma, dropout_key, train)`` returns the output F of the
  configured parameterization (dropout and train are ignored), so ``model.build`` and
  ``Components.drift`` use it exactly like the U-Net.
  """
  centres = bin_centre(jnp.asarray(train_images), num_levels)
  schedule = parameterization.schedule

  def init_params(key: jax.Array | None = None) -> jax.Array:
    del key
    return centres

  def net_fn(params: jax.Array, x_gamma: jax.Array, gamma: FloatLike,
             dropout_key: jax.Array | None = None, train: bool = False) -> jax.Array:
    del dropout_key, train
    gamma = jnp.broadcast_to(jnp.asarray(gamma, x_gamma.dtype), x_gamma.shape[:1])
    c = schedule.coefficients(gamma)
    x_hat, eps_hat, _ = posterior_means(params, x_gamma, c.alpha, c.sigma, block_elements)
    return parameterization.target(x_hat, eps_hat, gamma)

  return init_params, net_fn
