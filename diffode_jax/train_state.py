"""Training state (params, EMA params, optimizer state, step), the optimizer and the step.

The optimizer is optax AdamW with a linear warm-up, weight decay masked off biases and
normalization scales, optional global-norm clipping, wrapped in ``optax.MultiSteps`` for
gradient accumulation. The EMA moves only when the optimizer really updates.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from diffode_jax.discretization import nats_to_bpd


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # micro-batches consumed (= optimizer updates * grad_accum_steps)
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(config_training):
  return optax.warmup_constant_schedule(
      init_value=0.0, peak_value=config_training.learning_rate,
      warmup_steps=max(int(config_training.warmup_steps), 1))


def _decay_mask(params):
  """Weight decay on kernels only (not biases, not GroupNorm scales)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config_training) -> optax.GradientTransformation:
  t = config_training
  adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=t.weight_decay, mask=_decay_mask)
  chain = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw
  return optax.MultiSteps(chain, every_k_schedule=max(int(t.grad_accum_steps), 1))


def create_train_state(params, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params))


def make_train_step(loss_fn, optimizer: optax.MultiSteps, ema_decay: float, dim: int):
  """train_step(state, batch_uint8, key) -> (state, metrics) for one micro-batch.

  Metrics are batch means: ``loss`` (trained objective, bits/dim), ``diffusion_bpd``,
  ``second_order_bpd``, ``sde_bpd`` (recon + prior + diffusion), ``grad_norm``.
  """

  def train_step(state: TrainState, batch, key):
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, True)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    updated = optimizer.has_updated(opt_state)
    decay = jnp.where(updated, ema_decay, 1.0)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = TrainState(step=state.step + 1, params=params,
                           ema_params=ema, opt_state=opt_state)
    metrics = {
        "loss": loss,
        "diffusion_bpd": nats_to_bpd(terms.diffusion.mean(), dim),
        "second_order_bpd": nats_to_bpd(terms.second_order.mean(), dim),
        "sde_bpd": nats_to_bpd(terms.sde_nats().mean(), dim),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics

  return train_step
