"""Composes the pieces a finalized config describes: schedule, parameterization, network,
loss and drift (``build`` -> ``Components``), each a small factory over pure functions.

Finalizing and validating the config itself is ``config.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy.typing as npt

from diffode_jax import augmentation
from diffode_jax.data import image_shape
from diffode_jax.losses import InitFn, LossConfig, LossFn, NetFn, make_loss_fn
from diffode_jax.networks import make_network, switch
from diffode_jax.oracle import oracle_net
from diffode_jax.parameterization import Parameterization, make_parameterization
from diffode_jax.schedules import Schedule, make_schedule
from diffode_jax.errors import ConfigError
from diffode_jax.time_sampling import make_time_sampler

if TYPE_CHECKING:
  import ml_collections

PyTree: TypeAlias = Any
# (init_params, net_fn) of a network: the U-Net's, the oracle's, or a caller's own.
Net: TypeAlias = tuple[InitFn, NetFn]


@dataclasses.dataclass(frozen=True)
class Components:
  """Everything a run needs, built once from a finalized config."""

  schedule: Schedule
  parameterization: Parameterization
  init_params: InitFn  # key -> params
  net_fn: NetFn  # (params, x, gamma, dropout_key | None, train) -> F
  loss_fn: LossFn  # (params, k, key, train) -> (bpd, LossTerms)
  dim: int
  num_levels: int

  def drift(self, params: PyTree, x: jax.Array, gamma: jax.Array) -> jax.Array:
    """Probability-flow drift dx/dgamma (evaluation: no dropout)."""
    return self.parameterization.drift(self.net_fn(params, x, gamma, None, False), x, gamma)


def unet_net_fn(config: ml_collections.ConfigDict) -> Net:
  """(init_params, net_fn) for the U-Net of config.model."""
  network = make_network(config)
  shape = (1,) + image_shape(config.data)

  conditioned = bool(config.data.augment)  # the augmentation index is an input
  # The official input: one scalar per example, always present (0 unless augmented).
  scalar = switch(config.model, "cond_input") == "scalar"

  def init_params(key: jax.Array) -> PyTree:
    cond: jax.Array | None
    if scalar:
      cond = jnp.zeros((1,), jnp.float32)
    else:
      cond = augmentation.identity_cond(1) if conditioned else None
    return network.init({"params": key}, jnp.zeros(shape, jnp.float32),
                        jnp.zeros((1,), jnp.float32), train=False, cond=cond)["params"]

  def net_fn(params: PyTree, x: jax.Array, gamma: jax.Array | float,
             dropout_key: jax.Array | None, train: bool,
             cond: jax.Array | None = None) -> jax.Array:
    """cond: (B, 8) augmentation one-hot; None means the identity (untransformed data).

    With model.cond_input 'scalar' the network sees the official flag instead: 1 for a
    transformed image, 0 for an untransformed one (and always 0 without augmentation).
    """
    if scalar:
      cond = (jnp.zeros(x.shape[:1], x.dtype) if cond is None
              else augmentation.transformed_flag(cond))
    elif conditioned and cond is None:
      cond = augmentation.identity_cond(x.shape[0])
    elif not conditioned:
      cond = None
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    # without mutable=, apply returns the output alone
    return cast(jax.Array, network.apply({"params": params}, x, gamma, train=train, rngs=rngs,
                                         cond=cond))

  return init_params, net_fn


def oracle_net_fn(config: ml_collections.ConfigDict, train_images: npt.ArrayLike) -> Net:
  """(init_params, net_fn) of the closed-form oracle of train_images (docs/design.md, The
  oracle)."""
  parameterization = make_parameterization(config.model, make_schedule(config.model))
  return oracle_net(train_images, config.data.num_levels, parameterization)


def build(config: ml_collections.ConfigDict, net: Net | None = None,
          train_images: npt.ArrayLike | None = None) -> Components:
  """Components of a finalized config.

  The network is config.model.arch: the U-Net, or the oracle of ``train_images`` (the
  integer training set, required for arch 'oracle'). ``net`` = (init_params, net_fn)
  overrides both.
  """
  schedule = make_schedule(config.model)
  parameterization = make_parameterization(config.model, schedule)
  if net is None:
    if config.model.arch == "oracle":
      if train_images is None:
        raise ConfigError("model.arch='oracle' needs the training images to build")
      net = oracle_net_fn(config, train_images)
    else:
      net = unet_net_fn(config)
  init_params, net_fn = net
  loss_cfg = LossConfig(num_levels=config.data.num_levels,
                        second_order=bool(config.model.second_order),
                        second_order_weight=float(config.model.second_order_weight),
                        train_dequantization=config.training.dequantization)
  loss_fn = make_loss_fn(net_fn, parameterization, make_time_sampler(config, schedule),
                         loss_cfg)
  dim = math.prod(image_shape(config.data))
  return Components(schedule, parameterization, init_params, net_fn, loss_fn, dim,
                    config.data.num_levels)


def count_params(params: PyTree) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
