"""Training objectives (docs/design.md, Losses), per example, in nats.

First order, likelihood weighting (the continuous-time diffusion term of the VDM ELBO):

    L_1 = integral over gamma of 0.5 ||eps - eps_hat||^2 dgamma
        = E_{gamma ~ p} [ w(gamma) ||F* - F||^2 ],   w = 0.5 * k(gamma)^2 / p(gamma),

with k the parameterization's eps_scale (eps - eps_hat = k (F* - F)) and p the time
density: uniform gives 0.5 (gamma_max - gamma_min) k^2; importance sampling with
p ~ alpha^2 gives 0.5 Z (VP) or Z (SP).

Second order (velocity fine-tuning): w(gamma) * lambda * e^2 / D with e the trace residual
of ``Parameterization.second_order_residual``, r = ||F* - F||^2 held constant, and the
divergence tr(dF/dx) estimated with one Rademacher probe as v^T (J v), J v from a
forward-mode Jacobian-vector product (the forward pass comes with it for free).

The remaining VDM ELBO terms are reported beside it: ``prior`` = KL(q(x_1 | x) || N(0, I))
at gamma_max and ``recon`` = -log p(k | z_0) of the per-pixel decoder at gamma_min, so
that sde_bpd = (recon + prior + diffusion) / (D ln 2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import flax
import jax
import jax.numpy as jnp

from diffode_jax.decoder import decoder_log_likelihood
from diffode_jax.dequantization import dequantize_for_training
from diffode_jax.discretization import bin_centre, nats_to_bpd, sum_per_example
from diffode_jax.ode import draw_probe, hutchinson_jvp
from diffode_jax.parameterization import Parameterization
from diffode_jax.schedules import Schedule
from diffode_jax.time_sampling import TimeSampler

PyTree: TypeAlias = Any
# net_fn(params, x_gamma, gamma, dropout_key_or_None, train[, cond=...]) -> F
NetFn: TypeAlias = Callable[..., jax.Array]
# init_params(key) -> params of a network
InitFn: TypeAlias = Callable[[jax.Array], PyTree]


@flax.struct.dataclass
class LossTerms:
  """Per-example terms in nats, each of shape (B,)."""

  diffusion: jax.Array
  second_order: jax.Array
  prior: jax.Array
  recon: jax.Array

  def sde_nats(self) -> jax.Array:
    return self.recon + self.prior + self.diffusion


def prior_kl(x: jax.Array, schedule: Schedule) -> jax.Array:
  """KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)) at gamma_max, per example (nats)."""
  c1 = schedule.coefficients(jnp.asarray(schedule.gamma_max, x.dtype))
  alpha1, sigma1 = c1.alpha, c1.sigma
  var = sigma1**2
  return 0.5 * sum_per_example(var + (alpha1 * x) ** 2 - 1.0 - jnp.log(var))


def reconstruction_loss(key: jax.Array, k: jax.Array, x: jax.Array, schedule: Schedule,
                        num_levels: int) -> jax.Array:
  """-log p(k | z_0), z_0 = alpha_0 x + sigma_0 eps, one noise sample, per example."""
  c0 = schedule.coefficients(jnp.asarray(schedule.gamma_min, x.dtype))
  z0 = c0.alpha * x + c0.sigma * jax.random.normal(key, x.shape)
  return -decoder_log_likelihood(k, z0, schedule, num_levels)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  num_levels: int
  second_order: bool = False
  second_order_weight: float = 0.1  # lambda
  train_dequantization: str = "none"


class LossFn(Protocol):
  """loss_fn(params, k, key, train, cond=None) -> (scalar bits/dim, LossTerms)."""

  def __call__(self, params: PyTree, k: jax.Array, key: jax.Array, train: bool = True,
               cond: jax.Array | None = None) -> tuple[jax.Array, LossTerms]:
    ...


def make_loss_fn(net_fn: NetFn, parameterization: Parameterization,
                 time_sampler: TimeSampler, loss_config: LossConfig) -> LossFn:
  """Returns loss_fn(params, k, key, train, cond=None) -> (scalar bits/dim, LossTerms).

  ``k`` is an integer batch (B, H, W, C); the scalar is the mean over the batch of the
  trained terms (first order, plus second order when enabled) in bits/dim. ``cond``
  (e.g. the augmentation one-hot, (B, K)) is passed on to net_fn as ``cond=`` when given.
  """
  schedule = parameterization.schedule
  cfg = loss_config

  def loss_fn(params: PyTree, k: jax.Array, key: jax.Array, train: bool = True,
              cond: jax.Array | None = None) -> tuple[jax.Array, LossTerms]:
    dim = math.prod(k.shape[1:])
    batch = k.shape[0]
    key_deq, key_time, key_eps, key_drop, key_probe, key_rec = jax.random.split(key, 6)
    x = dequantize_for_training(cfg.train_dequantization, key_deq, k, schedule,
                                cfg.num_levels)
    gamma, inv_density = time_sampler.sample(key_time, batch)
    eps = jax.random.normal(key_eps, x.shape, x.dtype)
    x_gamma = schedule.marginal(x, eps, gamma)
    target = parameterization.target(x, eps, gamma)
    drop_key = key_drop if train else None
    net_kwargs: dict[str, jax.Array] = {} if cond is None else {"cond": cond}
    weight = 0.5 * inv_density * parameterization.eps_scale(gamma) ** 2

    if cfg.second_order:
      probe = draw_probe("rademacher", key_probe, x.shape, x.dtype)
      assert probe is not None  # a Rademacher probe, never the exact trace's None
      f, divergence = hutchinson_jvp(
          lambda y: net_fn(params, y, gamma, drop_key, train, **net_kwargs), x_gamma, probe)
    else:
      f = net_fn(params, x_gamma, gamma, drop_key, train, **net_kwargs)

    sq_error = sum_per_example((target - f) ** 2)
    diffusion = weight * sq_error
    if cfg.second_order:
      e = parameterization.second_order_residual(
          divergence, jax.lax.stop_gradient(sq_error), dim, gamma)
      second_order = weight * cfg.second_order_weight * e**2 / dim
    else:
      second_order = jnp.zeros_like(diffusion)

    centres = bin_centre(k, cfg.num_levels)
    terms = LossTerms(
        diffusion=diffusion,
        second_order=second_order,
        prior=prior_kl(centres, schedule),
        recon=reconstruction_loss(key_rec, k, centres, schedule, cfg.num_levels),
    )
    loss = nats_to_bpd(jnp.mean(diffusion + second_order), dim)
    return loss, terms

  return loss_fn
