"""Training state (params, EMA params, optimizer state, step), the optimizer and the step.

The optimizer is optax AdamW with a linear warm-up, weight decay masked off biases and
normalization scales (``training.weight_decay_mask = "kernels"``) or off biases only
(``"all_but_biases"``, the official i-DODE mask), optional global-norm clipping, wrapped
in ``optax.MultiSteps`` for gradient accumulation. The EMA moves only when the optimizer
really updates.

With gradient accumulation, ``training.batch_size`` is the micro-batch: one optimizer
update averages the gradients of ``grad_accum_steps`` consecutive micro-batches, and
``TrainState.step`` counts micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import flax
import jax
import jax.numpy as jnp
import optax

from diffode_jax import augmentation, keys
from diffode_jax.dequantization import TRAIN_DEQUANTIZATIONS
from diffode_jax.discretization import nats_to_bpd

if TYPE_CHECKING:
  import ml_collections

  from diffode_jax.losses import LossFn
  from diffode_jax.model import Components

PyTree: TypeAlias = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # micro-batches consumed (= optimizer updates * grad_accum_steps)
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree

  if TYPE_CHECKING:  # added by flax.struct.dataclass, which mypy does not see
    def replace(self, **updates: Any) -> TrainState: ...


# train_step(state, batch_uint8, key) -> (state, metrics)
TrainStepFn: TypeAlias = Callable[[TrainState, jax.Array, jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]


def check_training_config(config_training: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a config.training choice that does not exist."""
  t = config_training  # ranges of single fields: diffode_jax/config_fields.py
  if t.get("weight_decay_mask", "kernels") not in DECAY_MASKS:
    raise ValueError(f"unknown training.weight_decay_mask {t.weight_decay_mask!r}; expected "
                     f"one of {DECAY_MASKS}")
  if t.dequantization not in TRAIN_DEQUANTIZATIONS:
    raise ValueError(f"unknown training.dequantization {t.dequantization!r}; expected one "
                     f"of {TRAIN_DEQUANTIZATIONS}")


def learning_rate_schedule(config_training: ml_collections.ConfigDict) -> optax.Schedule:
  return optax.warmup_constant_schedule(
      init_value=0.0, peak_value=config_training.learning_rate,
      warmup_steps=max(int(config_training.warmup_steps), 1))


DECAY_MASKS = ("kernels", "all_but_biases")


def _leaf_name(path: tuple[Any, ...]) -> Any:
  return getattr(path[-1], "key", None)


def _decay_mask(params: PyTree) -> PyTree:
  """Weight decay on kernels only (not biases, not GroupNorm scales)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def _decay_all_but_biases(params: PyTree) -> PyTree:
  """The official i-DODE (and VDM) mask: every parameter but biases, GroupNorm scales too."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) != "bias", params)


def make_optimizer(config_training: ml_collections.ConfigDict) -> optax.MultiSteps:
  t = config_training
  mask = {"kernels": _decay_mask, "all_but_biases": _decay_all_but_biases}[
      t.get("weight_decay_mask", "kernels")]
  adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=t.weight_decay, mask=mask)
  chain = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw
  return optax.MultiSteps(chain, every_k_schedule=max(int(t.grad_accum_steps), 1))


def _find_nodes(tree: Any, keys: set[str], path: tuple[Any, ...] = ()
                ) -> list[tuple[Any, ...]]:
  """Paths of the dicts of a state dict whose keys are exactly ``keys``."""
  if not isinstance(tree, dict):
    return []
  if set(tree) == keys:
    return [path]
  return [p for k, v in tree.items() for p in _find_nodes(v, keys, path + (k,))]


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def adam_state_of(opt_state_dict: dict[str, Any]) -> dict[str, Any] | None:
  """{"count", "mu", "nu", "schedule_count"} of the one Adam state in an optimizer state
  dict (``flax.serialization.to_state_dict`` form, any chain or MultiSteps nesting), or
  None if there is not exactly one. ``schedule_count`` is the learning-rate schedule's
  step count (None when the optimizer had a constant rate, as the official code's)."""
  adams = _find_nodes(opt_state_dict, {"count", "mu", "nu"})
  if len(adams) != 1:
    return None
  adam = _get(opt_state_dict, adams[0])
  schedules = _find_nodes(opt_state_dict, {"count"})
  schedule = _get(opt_state_dict, schedules[0])["count"] if len(schedules) == 1 else None
  return {"count": adam["count"], "mu": adam["mu"], "nu": adam["nu"],
          "schedule_count": schedule}


def with_adam_state(opt_state: PyTree, adam: dict[str, Any]) -> PyTree:
  """opt_state of ``make_optimizer`` with the Adam moments and count of ``adam`` (as from
  ``adam_state_of``) and the schedule at ``adam["schedule_count"]`` (at the Adam count
  when None). The accumulation counters and accumulated gradients stay as they are."""
  sd = flax.serialization.to_state_dict(opt_state)
  (adam_path,) = _find_nodes(sd, {"count", "mu", "nu"})
  node = _get(sd, adam_path)
  as_dtype = lambda value, like: jnp.asarray(value, jnp.asarray(like).dtype)
  node["count"] = as_dtype(adam["count"], node["count"])
  node["mu"] = jax.tree.map(as_dtype, adam["mu"], node["mu"])
  node["nu"] = jax.tree.map(as_dtype, adam["nu"], node["nu"])
  schedule_count = adam.get("schedule_count")
  if schedule_count is None:
    schedule_count = adam["count"]
  for path in _find_nodes(sd, {"count"}):
    _get(sd, path)["count"] = as_dtype(schedule_count, _get(sd, path)["count"])
  return flax.serialization.from_state_dict(opt_state, sd)


def schedule_count(opt_state: PyTree) -> jax.Array | np.ndarray:
  """The learning-rate schedule's step count inside an optimizer state (0 if none)."""
  sd = flax.serialization.to_state_dict(opt_state)
  paths = _find_nodes(sd, {"count"})
  return _get(sd, paths[0])["count"] if paths else np.zeros((), np.int32)


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params))


def init_state(config: ml_collections.ConfigDict, components: Components,
               optimizer: optax.GradientTransformation,
               sharding: jax.sharding.Sharding | None = None) -> TrainState:
  """The initial TrainState of a run, computed on one device, then placed with ``sharding``.

  Computing it on one device keeps the compiled program the same for every device count
  and process count (one compilation-cache entry); every process computes the same values.
  """
  from diffode_jax.parallel import replicate

  init = lambda: create_train_state(components.init_params(keys.root_key(config, "init")),
                                    optimizer)
  state = jax.jit(init)()
  return state if sharding is None else replicate(state, sharding)


def ema_decay_at(ema_decay: float, num_updates: jax.Array | int, warmup: bool) -> jax.Array:
  """EMA decay after num_updates optimizer updates.

  With warmup the decay is min(ema_decay, (1 + n) / (10 + n)) (the num_updates rule of
  TensorFlow's ExponentialMovingAverage), so early EMAs do not stay near the random
  initialization: with 0.999 and no warm-up, 55% of the EMA is still the init after
  600 updates.
  """
  if not warmup:
    return jnp.asarray(ema_decay, jnp.float32)
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))


def make_train_step(loss_fn: LossFn, optimizer: optax.MultiSteps, ema_decay: float, dim: int,
                    augment: bool = False, ema_warmup: bool = True) -> TrainStepFn:
  """train_step(state, batch_uint8, key) -> (state, metrics) for one micro-batch.

  The EMA moves only on real updates, with ``ema_decay_at``'s warm-up when ``ema_warmup``.
  Metrics are batch means: ``loss`` (trained objective, bits/dim), ``diffusion_bpd``,
  ``second_order_bpd``, ``sde_bpd`` (recon + prior + diffusion), ``grad_norm``.
  With ``augment`` each image gets a random symmetry (``augmentation.augment``, drawn from
  fold_in(key, 1)) and loss_fn gets its one-hot as ``cond``; the loss itself uses ``key``
  either way.
  """

  def train_step(state: TrainState, batch: jax.Array, key: jax.Array
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    kwargs: dict[str, jax.Array] = {}
    if augment:
      batch, kwargs["cond"] = augmentation.augment(jax.random.fold_in(key, 1), batch)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, True, **kwargs)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    updated = optimizer.has_updated(opt_state)
    decay = jnp.where(updated, ema_decay_at(ema_decay, opt_state.gradient_step, ema_warmup),
                      1.0)
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
