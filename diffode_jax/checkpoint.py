"""The checkpoint store: orbax checkpoints of the training state in one directory
(``<workdir>/checkpoints``): save, restore, list steps, retention, damaged steps.

What a run does with them (restore or initialize, ``training.init_from``, carrying the
Adam state over) is run policy, in ``run/restore.py``; the EMA params a model is evaluated
with are read by ``diffode_jax.trained``.

The state is saved as a plain nested dict (``flax.serialization.to_state_dict``), so a
restore needs only a template of the same structure, and a checkpoint written by a
different architecture is reported as a mismatch instead of loading garbage.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>/`` and renames it
to ``<step>/`` only when every file (of every host) is written. A kill during a save
leaves a temporary folder that ``latest_step`` ignores (the previous step stays the
latest) and that the next training run deletes. In a gs:// bucket (no renames) orbax
writes ``<step>/`` in place and commits it by writing ``commit_success.txt`` last; a step
without it is ignored the same way and deleted the same way. Every process calls
``save``; orbax writes replicated arrays from the primary host only. Paths, local or
gs://, go through ``diffode_jax.storage``.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffode_jax import storage
from diffode_jax.errors import CheckpointError, described, warn
from diffode_jax.paths import checkpoint_dir

__all__ = ["CheckpointError", "Checkpointer", "DamagedCheckpoint", "check_shapes",
           "checkpoint_dir", "committed_steps", "resolve_source"]

PyTree = Any


def committed_steps(directory: str) -> list[int]:
  """The committed steps of a checkpoints directory, oldest first, read from the directory
  itself (no orbax manager): folders named by an integer (orbax renames a local step into
  place when it is complete); in a bucket, those that hold orbax's commit_success.txt
  (written last). [] when the directory does not exist."""
  if not storage.isdir(directory):
    return []
  steps = sorted(int(n) for n in storage.listdir(directory) if n.isdigit())
  if storage.is_remote(directory):
    steps = [s for s in steps
             if storage.exists(storage.join(directory, str(s), "commit_success.txt"))]
  return steps


def resolve_source(source: str) -> tuple[str, int | None]:
  """(checkpoints directory, step or None) of a workdir, its checkpoints/, or one step in it
  (local or gs://)."""
  path = storage.absolute(source.rstrip("/"))
  name = storage.basename(path)
  if name.isdigit() and storage.basename(storage.dirname(path)) == "checkpoints":
    return storage.dirname(path), int(name)
  if name == "checkpoints":
    return path, None
  return checkpoint_dir(path), None


def _abstract(tree: PyTree, sharding: jax.sharding.Sharding | None) -> PyTree:
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


# How long a reader waits before reading a step that looked damaged once more.
READ_RETRY_S = 0.5


class DamagedCheckpoint(CheckpointError):
  """A step whose files cannot be read (truncated, missing, corrupt), as opposed to one
  that does not match the configured model."""


class Checkpointer:
  """Saves and restores TrainState pytrees.

  Retention: after each save the newest ``keep`` steps are kept, and so is the step with
  the lowest training loss (``losses``: step -> loss of the rows logged up to it), so a
  run that slowly diverged never rotates its last good checkpoint out.

  Restores check the saved shapes (from the checkpoint's metadata) against the template
  first: a different shape is a mismatch (CheckpointError naming the array); a step whose
  files cannot be read is ``DamagedCheckpoint``. With ``fallback`` a restore of the
  latest step restores the newest intact one; ``damaged`` lists the damaged steps.

  Only the ``owner`` of the directory (the training run or import that holds the workdir's
  lock) moves a damaged step aside (renamed ``<step>.damaged``, kept for inspection, by
  process 0) or deletes steps. A reader beside a training run (evaluation, sampling,
  ``dj.load``) changes nothing: a step that disappears while it reads it was rotated out
  by the owner, not damaged, so the reader lists the steps again and takes the newest.

  A save that fails (a read-only or full disk) raises CheckpointError naming the path
  and the OS error; the manager is then left alone (``close`` does not wait on it).
  ``create`` makes the directory (and cleans up temporary folders of interrupted saves);
  without it, the directory must exist and nothing in it is changed except moving a
  damaged step aside.
  """

  def __init__(self, directory: str, keep: int = 3, create: bool = True,
               losses: dict | None = None, owner: bool = False):
    self.directory = directory
    self.keep = keep
    self.owner = owner
    self.losses = dict(losses or {})
    self.damaged: list = []
    self.failed = False
    self._options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                                 cleanup_tmp_directories=create)
    self.manager = self._open()

  def _open(self, attempts: int = 20) -> ocp.CheckpointManager:
    """A manager of the directory. Opening one lists the steps and reads each one's
    metadata: a step the owner deletes meanwhile (retention) fails that listing, so it is
    listed again."""
    for attempt in range(attempts):
      try:
        return ocp.CheckpointManager(self.directory, options=self._options)
      except FileNotFoundError:
        if attempt == attempts - 1:
          raise CheckpointError(f"the steps of {self.directory} kept disappearing while "
                                f"they were listed") from None
        time.sleep(0.05)

  def _relist(self):
    """A new manager, which lists the steps again (orbax's ``reload`` loses track of how
    the steps were saved, and its restores then fail)."""
    self.manager.close()
    self.manager = self._open()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, loss: float | None = None) -> None:
    """Saves (all processes call this), waits until the step is committed, then prunes."""
    try:
      with _orbax_quiet(std_logging.CRITICAL, thread_tracebacks=False):
        self.manager.save(int(step),
                          args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
        self.manager.wait_until_finished()
    except Exception as e:  # OSError, or orbax / tensorstore wrapping one
      self.failed = True
      raise CheckpointError(f"cannot write checkpoint step {step} to {self.directory}: "
                            f"{_os_error(e)}; {self._what_is_left(step)}") from None
    if loss is not None:
      self.losses[int(step)] = float(loss)
    self._prune()

  def _what_is_left(self, failed_step: int) -> str:
    """What a failed save leaves, as found on disk now (not as listed before)."""
    try:
      if not storage.exists(self.directory):
        return ("the checkpoints folder itself is gone (deleted during the run?): no "
                "checkpoint is left")
      names = storage.listdir(self.directory)
    except OSError:
      return "the checkpoints folder cannot be listed"
    steps = sorted(int(n) for n in names if n.isdigit() and int(n) != int(failed_step))
    if not steps:
      return "no earlier checkpoint is left"
    return f"the earlier checkpoints on disk are steps {steps}; rerun to resume from the newest"

  def _prune(self) -> None:
    steps = self.all_steps()
    keep = set(steps[-self.keep:])
    scored = [s for s in steps if s in self.losses and np.isfinite(self.losses[s])]
    if scored:
      keep.add(min(scored, key=lambda s: self.losses[s]))
    for s in steps:
      if s not in keep and self._exists(s):
        try:
          self.manager.delete(s)
        except FileNotFoundError:  # gone already: that is what the deletion wanted
          pass

  def _exists(self, step: int) -> bool:
    return storage.exists(storage.join(self.directory, str(step)))

  def _check_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(have {self.all_steps()})")
    return step

  def _saved_tree(self, step):
    """The saved array metadata tree of a step (DamagedCheckpoint if unreadable)."""
    path = storage.join(self.directory, str(step), "default")
    try:
      with _orbax_quiet(), ocp.StandardCheckpointer() as reader:
        meta = reader.metadata(path)
    except Exception as e:
      raise DamagedCheckpoint(f"checkpoint {self.directory} step {step} is damaged "
                              f"(metadata: {described(e)})") from None
    item = getattr(meta, "item_metadata", meta)
    tree = getattr(item, "tree", item)
    if not tree or not hasattr(tree, "get"):  # orbax could not parse the step's metadata
      raise DamagedCheckpoint(f"checkpoint {self.directory} step {step} is damaged (its "
                              f"metadata cannot be read)")
    return tree

  def _restore_step(self, step, target, subset, restore):
    """restore(step) after checking saved shapes of ``subset`` keys against target."""
    saved = self._saved_tree(step)
    for key in subset or [None]:
      got = saved if key is None else (saved.get(key) if hasattr(saved, "get") else None)
      if got is None:
        raise CheckpointError(f"checkpoint {self.directory} step {step} does not match the "
                              f"configured model (it has no {key!r})")
      check_shapes(target, got, f"checkpoint {self.directory} step {step}")
    try:
      return restore(step)
    except CheckpointError:
      raise
    except Exception as e:
      raise DamagedCheckpoint(f"checkpoint {self.directory} step {step} is damaged "
                              f"({described(e)})") from None

  def _with_fallback(self, step, fallback, attempt):
    if step is not None or not fallback:
      s = self._check_step(step)
      try:
        return attempt(s)
      except (DamagedCheckpoint, FileNotFoundError) as e:
        if self._exists(s):
          raise DamagedCheckpoint(str(e)) from None
        raise CheckpointError(f"checkpoint {self.directory} step {s} was deleted while it "
                              f"was read (rotated out by the training run)") from None
    self._check_step(None)
    tried, retried = set(), set()
    while True:
      candidates = [s for s in reversed(self.all_steps()) if s not in tried]
      if not candidates:
        break
      s = candidates[0]
      tried.add(s)
      try:
        return attempt(s)
      except (DamagedCheckpoint, FileNotFoundError) as e:
        if not self._exists(s):  # rotated out under a reader: list the steps again
          self._relist()
          continue
        if not self.owner and s not in retried:
          # A step the trainer is still finalizing can look damaged for a moment.
          retried.add(s)
          tried.discard(s)
          time.sleep(READ_RETRY_S)
          self._relist()
          continue
        self.damaged.append(s)
        moved = _move_aside(self.directory, s) if self.owner else None
        where = f"moved to {moved}" if moved else "left in place"
        warn(f"{e}; {where}; restoring the previous step")
    if not self.damaged:
      raise CheckpointError(f"no checkpoint in {self.directory}: every step was deleted "
                            f"while it was read")
    raise CheckpointError(f"every checkpoint in {self.directory} is damaged "
                          f"(steps {self.damaged}); nothing to restore")

  def restore(self, template: Any, step: int | None = None, sharding: Any = None,
              fallback: bool = False) -> Any:
    """Restores into the structure of ``template`` (latest step when step is None).

    ``sharding`` places every array (e.g. replicated over the mesh); None keeps the
    template's placement. ``fallback``: see the class docstring.
    """
    target = flax.serialization.to_state_dict(template)

    def attempt(s):
      restored = self._restore_step(s, target, None, lambda s: self.manager.restore(
          s, args=ocp.args.StandardRestore(_abstract(target, sharding))))
      check_shapes(target, restored, f"checkpoint {self.directory} step {s}")
      return flax.serialization.from_state_dict(template, restored)

    return self._with_fallback(step, fallback, attempt)

  def restore_params(self, params_template: Any, step: int | None = None,
                     sharding: Any = None, fallback: bool = False) -> tuple[Any, Any, int]:
    """(params, ema_params, step) of a checkpoint, without its optimizer state.

    For starting a new run from another one (fine-tuning) and for evaluation: the source
    may have used a different optimizer; only the network must match ``params_template``.
    """
    target = flax.serialization.to_state_dict(params_template)
    abstract = _abstract(target, sharding)
    item = {"params": abstract, "ema_params": abstract}

    def restore(s):
      return self.manager.restore(s, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))

    def attempt(s):
      restored = self._restore_step(s, target, ("params", "ema_params"), restore)
      for key in ("params", "ema_params"):
        check_shapes(target, restored[key], f"checkpoint {self.directory} step {s}")
      return (flax.serialization.from_state_dict(params_template, restored["params"]),
              flax.serialization.from_state_dict(params_template, restored["ema_params"]),
              s)

    return self._with_fallback(step, fallback, attempt)

  def restore_optimizer_state(self, step: int | None = None) -> dict:
    """The optimizer state of a checkpoint as a plain dict of NumPy arrays, in whatever
    structure the run that saved it used (for ``training.init_from_optimizer``: the
    caller picks the Adam moments out of it). Read through the same manager and damage
    handling as every other restore."""

    def attempt(s: int) -> dict:
      tree = self._saved_tree(s)
      if tree.get("opt_state") is None:
        raise CheckpointError(f"checkpoint {self.directory} step {s} holds no optimizer "
                              "state")
      here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      item = {"opt_state": jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=here),
          tree["opt_state"])}
      restored = self._restore_step(s, item["opt_state"], ("opt_state",), lambda s: self.manager.restore(
          s, args=ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)))
      return jax.tree.map(np.asarray, restored["opt_state"])

    return self._with_fallback(step, False, attempt)

  def close(self) -> None:
    if not self.failed:  # after a failed save orbax's threads may never finish
      self.manager.close()


@contextlib.contextmanager
def _orbax_quiet(level: int = std_logging.ERROR,
                 thread_tracebacks: bool = True) -> Iterator[None]:
  """The one place this module changes process-wide state, and only while orbax runs.

  Orbax reports through the absl logger, which is process-wide, and its background save
  threads report a failed write as an uncaught thread exception (``threading.excepthook``,
  also process-wide). Neither can be scoped to one call, so for the duration of the call
  the absl logger drops records below ``level`` and, with ``thread_tracebacks`` False,
  thread tracebacks are not printed; both are put back afterwards. Why: while reading a
  step's metadata orbax warns that the metadata is one folder up (a warning about its own
  layout, not a problem); while saving, a failure reaches the caller as one
  CheckpointError, so the tracebacks of orbax's threads would only repeat it.
  """
  absl_logger = logging.get_absl_logger()
  saved_level, hook = absl_logger.level, threading.excepthook
  absl_logger.setLevel(level)
  if not thread_tracebacks:
    threading.excepthook = lambda args: None
  try:
    yield
  finally:
    absl_logger.setLevel(saved_level)
    threading.excepthook = hook


def _os_error(e: Exception) -> str:
  """The OS error inside an exception chain, else its first line."""
  seen: BaseException | None = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return f"{seen.strerror}" + (f" ({seen.filename})" if seen.filename else "")
    seen = seen.__cause__ or seen.__context__
  return described(e)


def _move_aside(directory: str, step: int) -> str | None:
  """Renames <directory>/<step> to <step>.damaged (process 0 only); returns the new path."""
  if jax.process_index() != 0:
    return None
  source = storage.join(directory, str(step))
  target = source + ".damaged"
  n = 1
  try:
    while storage.exists(target):
      n += 1
      target = f"{source}.damaged{n}"
    storage.rename(source, target)
  except OSError:
    return None
  return target


def check_shapes(want: PyTree, got: PyTree, where: str) -> None:
  """Raises CheckpointError (``<where> does not match the configured model: ...``) unless
  ``got`` has the arrays of ``want`` with the same shapes, leaf by leaf in pytree order
  (``got`` may hold arrays or orbax's array metadata: anything with a shape)."""
  wanted = jax.tree_util.tree_flatten_with_path(want)[0]
  found = jax.tree_util.tree_flatten_with_path(got)[0]
  names = {jax.tree_util.keystr(p) for p, _ in wanted}
  for path, _ in found:
    if jax.tree_util.keystr(path) not in names:
      raise CheckpointError(f"{where} does not match the configured model: it has "
                            f"{jax.tree_util.keystr(path)}, which the model has not")
  leaves = [g for _, g in found]
  if len(wanted) != len(leaves):
    raise CheckpointError(f"{where} does not match the configured model ({len(leaves)} "
                          f"arrays, expected {len(wanted)})")
  for (path, w), g in zip(wanted, leaves):
    shape = tuple(g.shape) if hasattr(g, "shape") else np.shape(g)
    if tuple(np.shape(w)) != shape:
      raise CheckpointError(f"{where} does not match the configured model: "
                            f"{jax.tree_util.keystr(path)} has shape {shape}, expected "
                            f"{tuple(np.shape(w))}")
