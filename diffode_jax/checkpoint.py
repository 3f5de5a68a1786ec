"""Orbax checkpoints of the training state under ``<workdir>/checkpoints``.

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
from diffode_jax.errors import CheckpointError  # noqa: F401  (re-exported)




def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


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

  def restore_optimizer_state(self, step=None) -> dict:
    """The optimizer state of a checkpoint as a plain dict of NumPy arrays, in whatever
    structure the run that saved it used (for ``training.init_from_optimizer``: the
    caller picks the Adam moments out of it)."""
    step = self._check_step(step)
    meta = ocp.CheckpointManager(self.directory,
                                 options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers=ocp.StandardCheckpointHandler())
    try:
      tree = meta.item_metadata(step).tree
    finally:
      meta.close()
    if not isinstance(tree, dict) or "opt_state" not in tree:
      raise CheckpointError(f"checkpoint {self.directory} step {step} holds no optimizer "
                            "state")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                            tree["opt_state"])
    item = {"opt_state": abstract}
    restored = self.manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return jax.tree.map(np.asarray, restored["opt_state"])

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
