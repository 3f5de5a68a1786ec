"""The bound of ``likelihood.make_log_prob_fn`` as one pure JAX function of the params
(docs/own_model.md, Differentiating the bound).

``make_pure_log_prob_fn(drift, schedule, V, settings)`` returns
``log_prob(params, images, key) -> (N,)`` in nats: the same dequantization, divergence
probe, solve, prior and importance weighting as the evaluator, with nothing taken to the
host, so it can be jitted, vmapped and differentiated. ``jax.grad`` with respect to params
runs through diffrax's default adjoint, ``diffrax.RecursiveCheckpointAdjoint`` (reverse
mode through the solver's steps with checkpointing: exact gradients of the discretized
solve; memory grows with the log of max_steps times the state, not with the steps).

With the key of batch 0, ``jax.random.fold_in(key, 0)``, and all images in one batch it
equals ``Model.log_prob(images, key)`` on one device (same noise, probe and steps) in
float32. The state is solved in the default float type (float64 under
``jax_enable_x64``); the dequantization noise is drawn in float32 as in the evaluator. A
solve that fails (max_steps, non-finite) gives NaN for the batch, never a quiet number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffode_jax import ode
from diffode_jax import precision as precision_lib
from diffode_jax.errors import ConfigError
from diffode_jax.likelihood import EvalSettings, ParamsDrift, make_parts, solve_sample
from diffode_jax.schedules import Schedule

PyTree = Any
PureLogProbFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


def make_pure_log_prob_fn(drift: ParamsDrift, schedule: Schedule, num_levels: int,
                          settings: EvalSettings) -> PureLogProbFn:
  """log_prob(params, images, key) -> the bound on log P(k) per image (nats, (N,)).

  images: integers (N, H, W, C) in [0, V). Raises ConfigError for the host solver
  (scipy_rk45), which cannot be traced.
  """
  ode.check_on_device(settings.solver, "log_prob_fn")
  parts = make_parts(drift, schedule, num_levels, settings)
  K = settings.num_importance

  def log_prob(params: PyTree, images: jax.Array, key: jax.Array) -> jax.Array:
    k = jnp.asarray(images)
    if not jnp.issubdtype(k.dtype, jnp.integer):
      raise ConfigError(f"images must be integers in [0, {num_levels}), got dtype {k.dtype}")
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64
    bounds = []
    for i in range(K):
      bound, _, ok = solve_sample(parts, params, k, jax.random.fold_in(key, i), dtype=dtype)
      bounds.append(jnp.where(ok, bound, jnp.nan))  # a failed solve: NaN, never a number
    return jax.nn.logsumexp(jnp.stack(bounds), axis=0) - math.log(K)

  return precision_lib.traced_with(settings.precision, log_prob)
