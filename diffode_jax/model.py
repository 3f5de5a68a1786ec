"""Composes the pieces a config describes: schedule, parameterization, network, loss, drift.

``finalize_config`` fills the derived fields (gamma_min from the bit depth, gamma_u) and
checks the choices; everything else here is a small factory over pure functions.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffode_jax import augmentation, ode
from diffode_jax.data import check_data_config, image_shape
from diffode_jax.likelihood import EvalSettings
from diffode_jax.losses import LossConfig, make_loss_fn
from diffode_jax.networks import check_network_config, layout, make_network
from diffode_jax.oracle import oracle_net
from diffode_jax.parameterization import Parameterization, make_parameterization
from diffode_jax.sampling import sample_settings
from diffode_jax.schedules import Schedule, default_gamma_min, default_gamma_u, make_schedule
from diffode_jax.time_sampling import make_time_sampler
from diffode_jax.train_state import check_training_config
from diffode_jax.errors import ConfigError  # noqa: F401  (re-exported)

ARCHS = ("unet", "oracle")




def finalize_config(config):
  """A copy of config with derived fields filled in and the choices validated."""
  config = copy.deepcopy(config)
  v = config.data.num_levels
  if not isinstance(v, int) or v < 2:
    raise ConfigError(f"data.num_levels must be an integer >= 2, got {v!r}")
  with config.unlocked():
    if config.model.gamma_min is None:
      config.model.gamma_min = default_gamma_min(v)
    if config.eval.gamma_u is None:
      config.eval.gamma_u = default_gamma_u(v)
    m = config.model
    if m.get("fourier_max") is None:  # the coarsest frequency whose period fits in a bin
      m.fourier_max = math.ceil(math.log2(v)) - 1
    if m.get("fourier_min") is None:
      m.fourier_min = m.fourier_max - 1
  if config.model.fourier_min > config.model.fourier_max:
    raise ConfigError(f"model.fourier_min ({config.model.fourier_min}) must not exceed "
                      f"model.fourier_max ({config.model.fourier_max})")
  if config.model.arch not in ARCHS:
    raise ConfigError(f"unknown model.arch {config.model.arch!r}; expected one of {ARCHS}")
  try:
    check_data_config(config.data)
    check_network_config(config.model)
    check_training_config(config.training)
    schedule = make_schedule(config.model)
    make_parameterization(config.model, schedule)
    make_time_sampler(config, schedule)
    eval_settings(config)
    sample_settings(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.model.second_order and config.model.parameterization != "velocity":
    raise ConfigError("model.second_order applies to the velocity parameterization")
  return config


def eval_settings(config, **overrides) -> EvalSettings:
  """EvalSettings from config.eval; overrides accept the EvalSettings and solver fields."""
  e = config.eval
  solver_fields = {f.name for f in dataclasses.fields(ode.SolverConfig)}
  solver_kw = {"solver": e.solver, "rtol": e.rtol, "atol": e.atol, "max_steps": e.max_steps}
  solver_kw.update({k: v for k, v in overrides.items() if k in solver_fields})
  rest = {k: v for k, v in overrides.items() if k not in solver_fields}
  unknown = set(rest) - {"dequantization", "num_importance", "analytic_entropy",
                         "divergence", "gamma_u"}
  if unknown:
    raise ValueError(f"unknown evaluation override(s): {sorted(unknown)}")
  kw = {"dequantization": e.dequantization, "num_importance": e.num_importance,
        "analytic_entropy": e.analytic_entropy, "divergence": e.divergence,
        "gamma_u": e.gamma_u}
  kw.update(rest)
  return EvalSettings(solver=ode.SolverConfig(**solver_kw), **kw)


@dataclasses.dataclass(frozen=True)
class Components:
  """Everything a run needs, built once from a finalized config."""

  schedule: Schedule
  parameterization: Parameterization
  init_params: Callable[[Any], Any]  # key -> params
  net_fn: Callable  # (params, x, gamma, dropout_key | None, train) -> F
  loss_fn: Callable  # (params, k, key, train) -> (bpd, LossTerms)
  dim: int
  num_levels: int

  def drift(self, params, x, gamma):
    """Probability-flow drift dx/dgamma (evaluation: no dropout)."""
    return self.parameterization.drift(self.net_fn(params, x, gamma, None, False), x, gamma)


def unet_net_fn(config):
  """(init_params, net_fn) for the U-Net of config.model."""
  network = make_network(config)
  shape = (1,) + image_shape(config.data)

  conditioned = bool(config.data.augment)  # the augmentation index is an input
  # The official input: one scalar per example, always present (0 unless augmented).
  scalar = layout(config.model, "cond_input") == "scalar"

  def init_params(key):
    if scalar:
      cond = jnp.zeros((1,), jnp.float32)
    else:
      cond = augmentation.identity_cond(1) if conditioned else None
    return network.init({"params": key}, jnp.zeros(shape, jnp.float32),
                        jnp.zeros((1,), jnp.float32), train=False, cond=cond)["params"]

  def net_fn(params, x, gamma, dropout_key, train, cond=None):
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
    return network.apply({"params": params}, x, gamma, train=train, rngs=rngs, cond=cond)

  return init_params, net_fn


def oracle_net_fn(config, train_images):
  """(init_params, net_fn) of the closed-form oracle of train_images (SPEC 6)."""
  parameterization = make_parameterization(config.model, make_schedule(config.model))
  return oracle_net(train_images, config.data.num_levels, parameterization)


def build(config, net=None, train_images=None) -> Components:
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


def count_params(params) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
