"""The training loop (objectives and workdir: docs/design.md): train or resume, log, checkpoint,
and, every ``training.eval_every`` steps, the test bits/dim of the EMA params."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffode_jax import data as data_lib
from diffode_jax import keys, parallel, paths, precision, storage
from diffode_jax.checkpoint import Checkpointer, committed_steps
from diffode_jax.run.restore import restore_or_init
from diffode_jax.config import eval_settings, finalize_config, reconcile_with_workdir
from diffode_jax.errors import ConfigError, DataError, TrainingError, warn
from diffode_jax.evaluation import evaluate_batches
from diffode_jax.likelihood import make_log_prob_fn
from diffode_jax.report import summarize
from diffode_jax.data.spec import ImageData
from diffode_jax.model import Components, build
from diffode_jax.networks import check_sees_time
from diffode_jax.run import metrics as metrics_lib
from diffode_jax.run import workdir as workdir_lib
from diffode_jax.run.console import StopSignal, progress
from diffode_jax.run.guard import DivergenceGuard
from diffode_jax.run.lock import WorkdirLock, acquire_on_chief
from diffode_jax.train_state import (TrainState, learning_rate_schedule, make_optimizer, make_train_step,
                                     schedule_count)


def train(config: ml_collections.ConfigDict, workdir: str,
          command_line_fields: set[str] | None = None) -> dict:
  """Trains (or resumes) in workdir; returns the last logged metrics.

  Everything bad input can break (config values, device count, data, checkpoint
  compatibility, workdir permissions) is checked before the first file is written, so a
  failed start leaves the workdir as it was. Rerunning resumes from the latest intact
  checkpoint (a damaged one is moved aside with a warning): batches and keys are
  functions of the step, so the continuation equals an uninterrupted run; metrics.jsonl
  rows after the restored step are dropped. A resumed run takes what defines its model
  and data from the workdir's config.json; ``command_line_fields`` (the dotted fields set on the
  command line; None: all of them) may not contradict it (``config.reconcile_with_workdir``).
  ``training.init_from`` starts a new run (step 0, fresh optimizer, no EMA warm-up) from
  another run's params and EMA params; an existing checkpoint in workdir takes precedence.
  One training run per workdir (``run/lock.py``); the divergence guard (``run/guard.py``)
  stops a run whose loss leaves its running level, before saving it.
  """
  stop = StopSignal()  # from the start: a SIGTERM during start-up is a request to stop too
  try:
    return _train(config, workdir, command_line_fields, stop)
  finally:
    stop.restore()


def _train(config: ml_collections.ConfigDict, workdir: str,
           command_line_fields: set[str] | None, stop: StopSignal) -> dict:
  config = finalize_config(config)
  if config.model.arch == "oracle":
    raise ConfigError("model.arch='oracle' is closed-form and has nothing to train; "
                      "use --mode=eval_bpd or --mode=sample")
  workdir_lib.check_writable(workdir)
  saved = workdir_lib.saved_config(workdir)  # refuses to overwrite a garbage config.json
  resuming = saved is not None and bool(committed_steps(paths.checkpoint_dir(workdir)))
  if resuming:
    config = finalize_config(reconcile_with_workdir(config, saved, command_line_fields, resume=True))
  # A resumed run or a fine-tune keeps the layout its checkpoint fixes.
  check_sees_time(config.model, from_scratch=not resuming and not config.training.init_from)
  t = config.training
  parallel.check_batch(t.batch_size, "training.batch_size")
  train_data = parallel.chief_first(lambda: data_lib.load_split(config.data, "train"),
                                    "diffode_jax: data train prepared", (DataError,))
  components = build(config)
  is_chief = jax.process_index() == 0
  lock = WorkdirLock(paths.train_lock_path(workdir), "train", enabled=is_chief)
  acquire_on_chief(lock)
  try:
    return _restore_and_train(config, workdir, components, train_data, lock, stop)
  finally:
    lock.release()


def _stop_before_first_step(stop: StopSignal) -> bool:
  """Whether a stop was requested on any process before the first step (all agree)."""
  if jax.process_count() == 1:
    return stop.requested
  return parallel.on_any_process(stop.requested)


def _restore_and_train(config: ml_collections.ConfigDict, workdir: str, components: Components,
                       train_data: ImageData, lock: WorkdirLock, stop: StopSignal) -> dict:
  t = config.training
  mesh = parallel.make_mesh()
  replicated = parallel.replicated_sharding(mesh)
  optimizer = make_optimizer(t)
  accum = int(t.grad_accum_steps)
  total = int(t.num_steps) * accum

  state, resumed = restore_or_init(config, workdir, components, optimizer, replicated)
  step = int(state.step)
  if resumed and step > total:
    raise ConfigError(f"training.num_steps={t.num_steps} is below the step of the latest "
                      f"checkpoint ({step // accum} updates): nothing to train; raise "
                      f"num_steps to continue")
  if resumed and step == total:
    warn(f"the latest checkpoint is at training.num_steps={t.num_steps} already: nothing to "
         "train")
    return {"step": step, "nothing_to_do": True}
  parallel.sync("diffode_jax: checkpoints read")  # before any process creates checkpoints/
  if _stop_before_first_step(stop):
    return _stopped_at_start(step)
  # Until this run saves a checkpoint, what it creates is removed again if it fails or is
  # stopped: a failed start leaves the workdir as it was.
  created = workdir_lib.NewEntries(workdir, (paths.config_path(workdir),
                                             paths.checkpoint_dir(workdir),
                                             paths.metrics_path(workdir),
                                             paths.tensorboard_dir(workdir)),
                                    restore=(paths.config_path(workdir),))
  try:
    return _run_steps(config, workdir, components, train_data, lock, stop, state, resumed,
                      step, total, created, mesh, optimizer)
  except BaseException:
    if not created.kept:
      created.remove()
    raise


def _stopped_at_start(step: int) -> dict:
  message = (f"stopped by signal before the first step (at step {step}); nothing was "
             f"trained, so nothing was saved")
  warn(message, prefix="")
  return {"step": step, "stopped_at_start": True}


def _run_steps(config: ml_collections.ConfigDict, workdir: str, components: Components,
               train_data: ImageData, lock: WorkdirLock, stop: StopSignal, state: TrainState,
               resumed: bool, step: int, total: int, created: workdir_lib.NewEntries,
               mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation) -> dict:
  t = config.training
  replicated = parallel.replicated_sharding(mesh)
  is_chief = jax.process_index() == 0
  periodic_eval = make_periodic_eval(config, components) if t.eval_every and is_chief else None
  workdir_lib.ensure(workdir, subdirs=("checkpoints",))
  history = metrics_lib.logged_losses(workdir, step) if resumed else {}
  ckpt = Checkpointer(paths.checkpoint_dir(workdir), keep=t.keep_checkpoints, owner=True,
                      losses=_losses_at_checkpoints(history, workdir))
  guard = DivergenceGuard(t.divergence_factor, history.values())
  if is_chief:
    workdir_lib.write_json(paths.config_path(workdir), config.to_dict())
    metrics_lib.truncate_metrics(workdir, step if resumed else 0)

  # A fine-tune keeps its source's EMA: no EMA warm-up, which would mostly forget it.
  ema_warmup = bool(t.ema_warmup) and not t.init_from
  train_step = jax.jit(precision.traced_with(t.precision, make_train_step(
      components.loss_fn, optimizer, t.ema_decay, components.dim,
      augment=bool(config.data.augment), ema_warmup=ema_warmup)),
      donate_argnums=0, out_shardings=replicated)
  train_key = keys.root_key(config, "train")
  lr_schedule = learning_rate_schedule(t)
  writer = metrics_lib.MetricsWriter(workdir, bool(t.tensorboard)) if is_chief else None
  last_saved = step if resumed else None
  last_loss = history.get(step) if resumed else None
  pending, last_row = [], {}
  tic, tic_step = time.perf_counter(), step
  bar = progress(total, step, "train")
  try:
    while step < total:
      local = data_lib.host_batch(train_data, t.batch_size, step, config.seed,
                                  jax.process_index(), jax.process_count())
      state, metrics = train_step(state, parallel.global_batch(local, mesh),
                                  jax.random.fold_in(train_key, step))
      pending.append(metrics)
      step += 1
      bar.update(1)
      at_log = step % t.log_every == 0 or step == total
      if at_log:
        row = _reduce(pending, step)
        pending = []
        _check_row(row, step, last_saved, guard)
        last_loss = row["loss"]
        now = time.perf_counter()
        row["steps_per_sec"] = (step - tic_step) / max(now - tic, 1e-9)
        row["learning_rate"] = float(lr_schedule(schedule_count(state.opt_state)))
        tic, tic_step = now, step
        bar.set_postfix(loss_bpd=f"{row['loss']:.4f}", sde_bpd=f"{row['sde_bpd']:.3f}")
        if writer:
          writer.write(row)
        last_row = row
      # Before the checkpoint of the same step: a run killed between the two redoes the
      # evaluation after resuming (its row is dropped with the step's), never skips it.
      if periodic_eval is not None and step % t.eval_every == 0:
        eval_row = periodic_eval(parallel.local_copy(state.ema_params), step)
        bar.write(f"step {step}: test {eval_row['test_bpd']:.4f} +- "
                  f"{eval_row['test_bpd_stderr']:.4f} bits/dim")
        if writer:
          writer.write(eval_row)
        last_row = {**last_row, **eval_row} if last_row.get("step") == step else last_row
      # One process alone must not stop (the others would wait for it in a collective):
      # with several processes the signal is agreed on at log steps.
      stopping = stop.requested if jax.process_count() == 1 else (
          at_log and parallel.on_any_process(stop.requested))
      if step % t.checkpoint_every == 0 or step == total or stopping:
        if pending:
          row = _reduce(pending, step)
          _check_row(row, step, last_saved, guard)
          last_loss = row["loss"]
        if not bool(_all_finite(state.params)):
          raise TrainingError(f"non-finite parameters at step {step}; stopped, the last "
                              f"good checkpoint ({_describe(last_saved)}) is kept")
        if writer:  # the rows up to this step are stored before its checkpoint
          writer.flush()
        ckpt.save(step, state, loss=last_loss)
        last_saved = step
        if not created.kept:  # from now on the run's files are its results
          created.keep()
          lock.keep_directories()
        if stopping:
          warn(f"stopped by signal at step {step} after saving a checkpoint", prefix="")
          break
  finally:
    bar.close()
    ckpt.close()
    if writer:
      writer.close()
  return last_row


def _losses_at_checkpoints(history: dict, workdir: str) -> dict:
  """step -> loss of the last row logged at or before it, for the saved checkpoints."""
  steps = sorted(history)
  out = {}
  for s in committed_steps(paths.checkpoint_dir(workdir)):
    before = [h for h in steps if h <= s]
    if before:
      out[s] = history[before[-1]]
  return out


def make_periodic_eval(config: ml_collections.ConfigDict, components: Components
                       ) -> Callable[[Any, int], dict]:
  """eval_fn(ema_params, step) -> metrics row with the test bits/dim of the first
  ``training.eval_images`` images of eval.split.

  config.eval's dequantization, divergence and solver with K = 1 (cheap; ``tn`` by
  default), the keys of ``--mode=eval_bpd`` (``keys.eval_key``): at the same batch size the
  numbers equal eval_bpd's on those images, and every evaluation of a run sees the same
  noise, so the curve moves only with the params. Runs on this process's first device.
  """
  t, e = config.training, config.eval
  images = data_lib.load_split(config.data, e.split).images[:t.eval_images]
  settings = eval_settings(config, num_importance=1)
  batch_size = min(int(e.batch_size), len(images))
  log_prob = make_log_prob_fn(components.drift, components.schedule, components.num_levels,
                              settings)
  key = keys.eval_key(config)

  def eval_fn(ema_params, step):
    rows = [r for batch in evaluate_batches(log_prob, ema_params, images, batch_size, key,
                                            settings, components.dim)
            for r in batch]
    s = summarize(rows)
    return {"step": step, "test_bpd": s["bpd"], "test_bpd_stderr": s["bpd_stderr"],
            "test_nfe": s["nfe_mean"], "test_images": s["num_images"],
            "test_dequantization": settings.dequantization}

  return eval_fn


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _describe(last_saved: int | None) -> str:
  return "none saved yet" if last_saved is None else f"step {last_saved}"


def _reduce(pending, step):
  stacked = jax.device_get(pending)
  row = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
  row["step"] = step
  return row


def _check_row(row, step, last_saved, guard):
  """TrainingError for a non-finite metric or a loss the divergence guard rejects."""
  bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    raise TrainingError(
        f"non-finite {', '.join(sorted(bad))} at step {step}; stopped, the last good "
        f"checkpoint ({_describe(last_saved)}) is kept")
  reason = guard.check(row["loss"])
  if reason:
    raise TrainingError(
        f"diverged at step {step}: {reason}; stopped without saving, the last good "
        f"checkpoint ({_describe(last_saved)}) is kept")
