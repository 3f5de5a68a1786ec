"""Orbax checkpoints of the training state under ``<workdir>/checkpoints``.

The state is saved as a plain nested dict (``flax.serialization.to_state_dict``), so a
restore needs only a template of the same structure, and a checkpoint written by a
different architecture is reported as a mismatch instead of loading garbage.
"""

from __future__ import annotations

import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """Missing or incompatible checkpoint; shown to the user as one line."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores TrainState pytrees; keeps the last ``keep`` steps."""

  def __init__(self, directory: str, keep: int = 3, create: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    self.manager.save(int(step), args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
    self.manager.wait_until_finished()

  def restore(self, template, step=None):
    """Restores into the structure of ``template`` (latest step when step is None)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(have {self.all_steps()})")
    target = flax.serialization.to_state_dict(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} does not match the configured model "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    _check_shapes(target, restored, self.directory, step)
    return flax.serialization.from_state_dict(template, restored)

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
