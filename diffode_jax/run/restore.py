"""Run policy for training: restore or initialize the state of a run (``restore_or_init``),
start from another run's params (``training.init_from``, ``load_params``) and carry its
Adam state over (``training.init_from_optimizer``, ``load_adam_state``). The checkpoints
themselves are read and written by the store, ``diffode_jax.checkpoint``.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from diffode_jax import storage
from diffode_jax.checkpoint import Checkpointer, resolve_source
from diffode_jax.errors import CheckpointError
from diffode_jax.model import Components
from diffode_jax.paths import checkpoint_dir
from diffode_jax.train_state import (TrainState, adam_state_of, create_train_state,
                                     init_state, with_adam_state)

PyTree = Any


def restore_or_init(config: ml_collections.ConfigDict, workdir: str, components: Components,
                    optimizer: optax.GradientTransformation,
                    sharding: jax.sharding.Sharding) -> tuple[TrainState, bool]:
  """(state, resumed): workdir's latest checkpoint, else training.init_from, else a new state.

  Restores go straight into the abstract shape of the state (nothing is initialized
  first), so a mismatched checkpoint is reported before any compilation.
  """
  abstract = jax.eval_shape(lambda: init_state(config, components, optimizer))
  directory = checkpoint_dir(workdir)
  if storage.isdir(directory):
    ckpt = Checkpointer(directory, create=False, owner=True)  # the caller holds the lock
    try:
      if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract, sharding=sharding, fallback=True)
        logging.info("resumed from step %d", int(state.step))
        return state, True
    finally:
      ckpt.close()
  source = config.training.init_from
  if source:
    params, ema, step = load_params(source, abstract.params, sharding)
    adam = (load_adam_state(source, step, abstract.params)
            if config.training.get("init_from_optimizer") else None)
    state = jax.jit(lambda p, e, a: _new_state(p, e, a, optimizer),
                    out_shardings=sharding)(params, ema, adam)
    logging.info("initialized params and EMA params from %s (step %d)", source, step)
    return state, False
  return init_state(config, components, optimizer, sharding), False


def load_params(source: str, params_template: PyTree,
                sharding: jax.sharding.Sharding | None = None) -> tuple[PyTree, PyTree, int]:
  """(params, ema_params, step) of a workdir, its checkpoints/, or checkpoints/<step>."""
  problem = storage.unsupported(source) or storage.check_bucket(source)
  if problem:
    raise CheckpointError(f"training.init_from={source!r}: {problem}")
  directory, step = resolve_source(source)
  if not storage.isdir(directory):
    raise CheckpointError(f"training.init_from={source!r}: no checkpoints in {directory}")
  ckpt = Checkpointer(directory, create=False)
  try:
    return ckpt.restore_params(params_template, step, sharding)
  finally:
    ckpt.close()


def _new_state(params: PyTree, ema_params: PyTree, adam: dict | None,
               optimizer: optax.GradientTransformation) -> TrainState:
  state = create_train_state(params, optimizer).replace(ema_params=ema_params)
  if adam is not None:
    state = state.replace(opt_state=with_adam_state(state.opt_state, adam))
  return state


def load_adam_state(source: str, step: int, params_template: PyTree) -> dict:
  """The Adam moments and counts of a checkpoint (``adam_state_of``), checked against the
  params; CheckpointError if the checkpoint's optimizer state has none that fit."""
  directory, _ = resolve_source(source)
  ckpt = Checkpointer(directory, create=False)
  try:
    adam = adam_state_of(ckpt.restore_optimizer_state(step))
  finally:
    ckpt.close()
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  if adam is None or any(shapes(adam[k]) != shapes(params_template) for k in ("mu", "nu")):
    raise CheckpointError(f"training.init_from_optimizer: the optimizer state of {source!r} "
                          f"step {step} holds no Adam moments of the configured model")
  return adam
