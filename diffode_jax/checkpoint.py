"""Orbax checkpoints of the training state under ``<workdir>/checkpoints``, and the restore
logic every mode shares: restore-or-init for training (``restore_or_init``), the params
of another run for a fine-tune (``load_params``), the EMA params for evaluation
(``restore_for_eval``).

The state is saved as a plain nested dict (``flax.serialization.to_state_dict``), so a
restore needs only a template of the same structure, and a checkpoint written by a
different architecture is reported as a mismatch instead of loading garbage.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>/`` and renames it
to ``<step>/`` only when every file (of every host) is written. A kill during a save
leaves a temporary folder that ``latest_step`` ignores (the previous step stays the
latest) and that the next training run deletes. Every process calls ``save``; orbax
writes replicated arrays from the primary host only.
"""

from __future__ import annotations

import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffode_jax import keys
from diffode_jax.model import Components, build
from diffode_jax.paths import checkpoint_dir
from diffode_jax.train_state import TrainState, create_train_state, init_state
from diffode_jax.errors import CheckpointError

__all__ = ["CheckpointError", "Checkpointer", "checkpoint_dir", "load_params",
           "resolve_source", "restore_for_eval", "restore_or_init"]




def resolve_source(source: str) -> tuple[str, int | None]:
  """(checkpoints directory, step or None) of a workdir, its checkpoints/, or one step in it."""
  path = os.path.abspath(source.rstrip("/"))
  name = os.path.basename(path)
  if name.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(path), int(name)
  if name == "checkpoints":
    return path, None
  return checkpoint_dir(path), None


def _abstract(tree, sharding):
  """ShapeDtypeStructs of tree's arrays, placed with ``sharding``.

  With sharding None, jax arrays keep their placement and anything else (NumPy arrays,
  shape structs) goes to this process's first device: never the sharding recorded in the
  checkpoint, which names devices that may not exist here (a run saved on 8 devices is
  restored for evaluation on 1).
  """
  if sharding is not None:
    place = lambda a: sharding
  else:
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    place = lambda a: a.sharding if isinstance(a, jax.Array) else here
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=place(a)),
                      tree)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]


class Checkpointer:
  """Saves and restores TrainState pytrees; keeps the last ``keep`` steps.

  ``create`` makes the directory (and cleans up temporary folders of interrupted saves);
  without it, the directory must exist and nothing in it is changed.
  """

  def __init__(self, directory: str, keep: int = 3, create: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           cleanup_tmp_directories=create)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    """Saves (all processes call this) and waits until the step is committed."""
    self.manager.save(int(step),
                      args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
    self.manager.wait_until_finished()

  def _check_step(self, step):
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(have {self.all_steps()})")
    return step

  def restore(self, template, step=None, sharding=None):
    """Restores into the structure of ``template`` (latest step when step is None).

    ``sharding`` places every array (e.g. replicated over the mesh); None keeps the
    template's placement.
    """
    step = self._check_step(step)
    target = flax.serialization.to_state_dict(template)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.StandardRestore(_abstract(target, sharding)))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} does not match the configured model "
          f"({type(e).__name__}: {_first_line(e)})") from None
    _check_shapes(target, restored, self.directory, step)
    return flax.serialization.from_state_dict(template, restored)

  def restore_params(self, params_template, step=None, sharding=None):
    """(params, ema_params, step) of a checkpoint, without its optimizer state.

    For starting a new run from another one (fine-tuning): the source may have used a
    different optimizer; only the network must match ``params_template``.
    """
    step = self._check_step(step)
    target = flax.serialization.to_state_dict(params_template)
    abstract = _abstract(target, sharding)
    item = {"params": abstract, "ema_params": abstract}
    try:
      restored = self.manager.restore(step, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} does not match the configured model "
          f"({type(e).__name__}: {_first_line(e)})") from None
    for key in ("params", "ema_params"):
      _check_shapes(target, restored[key], self.directory, step)
    return (flax.serialization.from_state_dict(params_template, restored["params"]),
            flax.serialization.from_state_dict(params_template, restored["ema_params"]),
            step)

  def close(self):
    self.manager.close()


def _check_shapes(target, restored, directory, step):
  want = jax.tree_util.tree_flatten_with_path(target)[0]
  got = jax.tree.leaves(restored)
  if len(want) != len(got):
    raise CheckpointError(f"checkpoint {directory} step {step} does not match the "
                          f"configured model ({len(got)} arrays, expected {len(want)})")
  for (path, w), g in zip(want, got):
    if np.shape(w) != np.shape(g):
      raise CheckpointError(
          f"checkpoint {directory} step {step} does not match the configured model: "
          f"{jax.tree_util.keystr(path)} has shape {np.shape(g)}, expected {np.shape(w)}")


# ----------------------------------------------------------------------------- restores


def restore_or_init(config, workdir: str, components: Components, optimizer,
                    sharding) -> tuple[TrainState, bool]:
  """(state, resumed): workdir's latest checkpoint, else training.init_from, else a new state.

  Restores go straight into the abstract shape of the state (nothing is initialized
  first), so a mismatched checkpoint is reported before any compilation.
  """
  abstract = jax.eval_shape(lambda: init_state(config, components, optimizer))
  directory = checkpoint_dir(workdir)
  if os.path.isdir(directory):
    ckpt = Checkpointer(directory, create=False)
    try:
      if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract, sharding=sharding)
        logging.info("resumed from step %d", int(state.step))
        return state, True
    finally:
      ckpt.close()
  source = config.training.init_from
  if source:
    params, ema, step = load_params(source, abstract.params, sharding)
    state = jax.jit(lambda p, e: create_train_state(p, optimizer).replace(ema_params=e),
                    out_shardings=sharding)(params, ema)
    logging.info("initialized params and EMA params from %s (step %d)", source, step)
    return state, False
  return init_state(config, components, optimizer, sharding), False


def load_params(source: str, params_template, sharding=None):
  """(params, ema_params, step) of a workdir, its checkpoints/, or checkpoints/<step>."""
  directory, step = resolve_source(source)
  if not os.path.isdir(directory):
    raise CheckpointError(f"training.init_from={source!r}: no checkpoints in {directory}")
  ckpt = Checkpointer(directory, create=False)
  try:
    return ckpt.restore_params(params_template, step, sharding)
  finally:
    ckpt.close()


def restore_ema_params(config, workdir: str, components: Components, step=None):
  """(EMA params, step) of a checkpoint; CheckpointError if there is none or it mismatches."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoints in {directory}: train first (--mode=train)")
  ckpt = Checkpointer(directory, create=False)
  try:
    template = jax.eval_shape(components.init_params, keys.root_key(config, "init"))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    _, ema_params, step = ckpt.restore_params(template, step)
    return ema_params, step
  finally:
    ckpt.close()


def restore_for_eval(config, workdir: str, step=None):
  """(components, params, checkpoint step) of a finalized config, for evaluation/sampling.

  The U-Net restores the EMA params of a checkpoint in workdir (the latest when step is
  None). The oracle (SPEC 6) has no checkpoint: its params are the training split, step
  is None.
  """
  if config.model.arch == "oracle":
    from diffode_jax import data

    components = build(config, train_images=data.load_split(config.data, "train").images)
    return components, components.init_params(None), None
  components = build(config)
  params, ckpt_step = restore_ema_params(config, workdir, components, step)
  return components, params, ckpt_step
