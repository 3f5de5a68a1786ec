"""The loops: the only place with I/O, logging, progress bars and workdir files (SPEC 8).

Workdir layout:

    config.json            the finalized config of the run
    checkpoints/           orbax, one folder per step; rerunning train resumes the latest
    metrics.jsonl          one JSON object per logged step
    tensorboard/           TensorBoard events
    eval/bpd.json          evaluation report (SPEC 5 fields + checkpoint step)
    eval/per_image.jsonl   per-image bits/dim, appended batch by batch (resumable)
    samples/               grid.png, samples.npz, sample.json of --mode=sample

With model.arch = "oracle" (SPEC 6) there is nothing to train or restore: evaluation and
sampling take the params from the training split.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffode_jax import data as data_lib
from diffode_jax.checkpoint import (Checkpointer, CheckpointError, checkpoint_dir,
                                    resolve_source)
from diffode_jax.likelihood import (evaluate_batches, make_log_prob_fn, settings_report,
                                    summarize)
from diffode_jax.model import ConfigError, build, eval_settings, finalize_config
from diffode_jax.sampling import draw, image_grid, make_sample_fn, sample_settings
from diffode_jax.train_state import (adam_state_of, create_train_state,
                                     learning_rate_schedule, make_optimizer, make_train_step,
                                     schedule_count, with_adam_state)
from diffode_jax.errors import TrainingError  # noqa: F401  (re-exported)




# ----------------------------------------------------------------------------- helpers


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return Mesh(np.array(jax.devices()), ("data",))


def check_batch(batch_size: int, what: str) -> None:
  """The global batch is split evenly over all devices of all processes."""
  n = jax.device_count()
  if batch_size % n:
    raise TrainingError(f"{what}={batch_size} is not divisible by the {n} devices "
                        f"({jax.process_count()} process(es)); each takes an equal share")


def global_batch(local: np.ndarray, mesh: Mesh):
  """Assembles the global batch array from this process's slice."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


def check_local_workdir(workdir: str) -> None:
  """Raises TrainingError for a URL workdir (gs://...): files here go through the local
  file system, which would silently write a local folder named 'gs:' instead."""
  if "://" in workdir:
    raise TrainingError(
        f"workdir {workdir!r}: URL workdirs are not supported yet; use a local path (on a "
        "Cloud TPU VM, a bucket mounted with gcsfuse is one)")


def check_workdir_writable(workdir: str) -> None:
  """Raises TrainingError unless workdir is (or can be created as) a writable directory.

  Changes nothing on disk; ``ensure_workdir`` then creates it and really writes.
  """
  check_local_workdir(workdir)
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise TrainingError(f"workdir {workdir!r} is not a directory")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise TrainingError(f"workdir {workdir!r} is not writable: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise TrainingError(f"workdir {workdir!r} is not writable: {existing!r} is read-only")


def ensure_workdir(workdir: str) -> None:
  """Creates workdir and checks that this process can write a file into it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"workdir {workdir!r} is not writable: {e.strerror}") from None


def _progress(total: int, initial: int, desc: str):
  from tqdm import tqdm  # a dependency of tensorflow-datasets; progress bars only

  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
              disable=jax.process_index() != 0, file=sys.stderr)


def write_json(path: str, obj) -> None:
  """Writes atomically (temp file + rename) so a kill never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _rng(config, purpose: str):
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), _PURPOSES[purpose])


_PURPOSES = {"init": 0, "train": 1, "eval": 2, "sample": 3}


def init_state(config, components, optimizer, sharding=None):
  """The initial TrainState, computed on one device, then placed with ``sharding``.

  Computing it on one device keeps the compiled program the same for every device count
  and process count (one compilation-cache entry); every process computes the same values.
  """
  init = lambda: create_train_state(components.init_params(_rng(config, "init")), optimizer)
  state = jax.jit(init)()
  return state if sharding is None else replicate(state, sharding)


def replicate(tree, sharding):
  """Places a pytree whose values are the same on every process with ``sharding``."""

  def place(leaf):
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, tree)


def restore_for_eval(config, workdir: str, components, step=None):
  """(EMA params, step) of a checkpoint; CheckpointError if there is none or it mismatches."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoints in {directory}: train first (--mode=train)")
  ckpt = Checkpointer(directory, create=False)
  try:
    template = jax.eval_shape(components.init_params, _rng(config, "init"))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    _, ema_params, step = ckpt.restore_params(template, step)
    return ema_params, step
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------- training


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in workdir; returns the last logged metrics.

  Everything bad input can break (config values, device count, data, checkpoint
  compatibility, workdir permissions) is checked before the first file is written, so a
  failed start leaves the workdir as it was. Rerunning resumes from the latest committed
  checkpoint: batches and keys are functions of the step, so the continuation equals an
  uninterrupted run; metrics.jsonl rows after the restored step are dropped.
  ``training.init_from`` starts a new run (step 0, fresh optimizer, no EMA warm-up) from
  another run's params and EMA params; an existing checkpoint in workdir takes precedence.
  With ``training.init_from_optimizer`` the Adam moments and counts carry over too.
  """
  config = finalize_config(config)
  if config.model.arch == "oracle":
    raise ConfigError("model.arch='oracle' is closed-form and has nothing to train; "
                      "use --mode=eval_bpd or --mode=sample")
  t = config.training
  check_workdir_writable(workdir)
  check_batch(t.batch_size, "training.batch_size")
  train_data = load_split_on_every_host(config.data, "train")
  components = build(config)
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  optimizer = make_optimizer(t)
  accum = int(t.grad_accum_steps)
  total = int(t.num_steps) * accum

  state, resumed = _restore_or_init_from(config, workdir, components, optimizer, replicated)
  _sync("diffode_jax: checkpoints read")  # before any process creates checkpoints/
  ensure_workdir(workdir)
  ckpt = Checkpointer(checkpoint_dir(workdir), keep=t.keep_checkpoints)
  step = int(state.step)
  is_chief = jax.process_index() == 0
  if is_chief:
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    truncate_metrics(os.path.join(workdir, "metrics.jsonl"), step if resumed else 0)

  # A fine-tune keeps its source's EMA: no EMA warm-up, which would mostly forget it.
  ema_warmup = bool(t.ema_warmup) and not t.init_from
  train_step = jax.jit(
      make_train_step(components.loss_fn, optimizer, t.ema_decay, components.dim,
                      augment=bool(config.data.augment), ema_warmup=ema_warmup),
      donate_argnums=0, out_shardings=replicated)
  train_key = _rng(config, "train")
  lr_schedule = learning_rate_schedule(t)
  writer = _MetricsWriter(workdir, bool(t.tensorboard)) if is_chief else None
  stop = _StopSignal()
  last_saved = step if resumed else None
  pending, last_row = [], {}
  tic, tic_step = time.perf_counter(), step
  bar = _progress(total, step, "train")
  try:
    while step < total:
      local = data_lib.host_batch(train_data, t.batch_size, step, config.seed,
                                  jax.process_index(), jax.process_count())
      state, metrics = train_step(state, global_batch(local, mesh),
                                  jax.random.fold_in(train_key, step))
      pending.append(metrics)
      step += 1
      bar.update(1)
      at_log = step % t.log_every == 0 or step == total
      if at_log:
        row = _reduce(pending, step)
        pending = []
        _check_finite(row, step, last_saved)
        now = time.perf_counter()
        row["steps_per_sec"] = (step - tic_step) / max(now - tic, 1e-9)
        row["learning_rate"] = float(lr_schedule(schedule_count(state.opt_state)))
        tic, tic_step = now, step
        bar.set_postfix(loss_bpd=f"{row['loss']:.4f}", sde_bpd=f"{row['sde_bpd']:.3f}")
        if writer:
          writer.write(row)
        last_row = row
      # One process alone must not stop (the others would wait for it in a collective):
      # with several processes the signal is agreed on at log steps.
      stopping = stop.requested if jax.process_count() == 1 else (
          at_log and _on_any_process(stop.requested))
      if step % t.checkpoint_every == 0 or step == total or stopping:
        if pending:
          _check_finite(_reduce(pending, step), step, last_saved)
        if not bool(_all_finite(state.params)):
          raise TrainingError(f"non-finite parameters at step {step}; stopped, the last "
                              f"good checkpoint ({_describe(last_saved)}) is kept")
        ckpt.save(step, state)
        last_saved = step
        if stopping:
          logging.warning("stopped by signal at step %d after saving a checkpoint", step)
          break
  finally:
    bar.close()
    stop.restore()
    ckpt.close()
    if writer:
      writer.close()
  return last_row


def load_split_on_every_host(config_data, split: str) -> data_lib.ImageData:
  """load_split on every process; process 0 first, so a tfds data set is prepared once."""
  if jax.process_count() == 1:
    return data_lib.load_split(config_data, split)
  error = None
  if jax.process_index() == 0:
    try:
      loaded = data_lib.load_split(config_data, split)
    except data_lib.DataError as e:
      error = e
  _sync(f"diffode_jax: data {split} prepared")
  if error is not None:
    raise error
  if jax.process_index() != 0:
    loaded = data_lib.load_split(config_data, split)
  return loaded


def _restore_or_init_from(config, workdir, components, optimizer, sharding):
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
    adam = (load_adam_state(source, step, abstract.params)
            if config.training.get("init_from_optimizer") else None)
    state = jax.jit(lambda p, e, a: _new_state(p, e, a, optimizer),
                    out_shardings=sharding)(params, ema, adam)
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


def _new_state(params, ema_params, adam, optimizer):
  state = create_train_state(params, optimizer).replace(ema_params=ema_params)
  if adam is not None:
    state = state.replace(opt_state=with_adam_state(state.opt_state, adam))
  return state


def load_adam_state(source: str, step: int, params_template) -> dict:
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


def truncate_metrics(path: str, step: int) -> None:
  """Drops metrics.jsonl rows after ``step`` (and a row cut by a kill): a resumed run
  rewrites them, so each step appears once."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _sync(name: str) -> None:
  """A barrier of all processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _on_any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _describe(last_saved) -> str:
  return "none saved yet" if last_saved is None else f"step {last_saved}"


def _reduce(pending, step):
  stacked = jax.device_get(pending)
  row = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
  row["step"] = step
  return row


def _check_finite(row, step, last_saved):
  bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    raise TrainingError(
        f"non-finite {', '.join(sorted(bad))} at step {step}; stopped, the last good "
        f"checkpoint ({_describe(last_saved)}) is kept")


class _MetricsWriter:
  """metrics.jsonl (appended, flushed per row) and TensorBoard scalars."""

  def __init__(self, workdir, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.file = open(self.path, "a")
    self.tb = None
    if tensorboard:
      try:
        from flax.metrics import tensorboard as tb

        self.tb = tb.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # tensorboard not installed: metrics.jsonl only
        self.tb = None

  def write(self, row):
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if self.tb:
      for k, v in row.items():
        if k != "step":
          self.tb.scalar(k, v, row["step"])
      self.tb.flush()

  def close(self):
    self.file.close()
    if self.tb:
      self.tb.close()


class _StopSignal:
  """Turns SIGTERM into a request to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._old = None
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------- evaluation


def eval_key(config):
  """The root key of evaluation: batch b of eval_bpd uses fold_in(eval_key, b)."""
  return _rng(config, "eval")


def model_for_eval(config, workdir, step=None):
  """(components, params, checkpoint step) of a finalized config.

  The U-Net restores the EMA params of a checkpoint in workdir (the latest when step is
  None). The oracle has no checkpoint: its params are the training split, step is None.
  """
  if config.model.arch == "oracle":
    train_images = data_lib.load_split(config.data, "train").images
    components = build(config, train_images=train_images)
    return components, components.init_params(None), None
  components = build(config)
  params, ckpt_step = restore_for_eval(config, workdir, components, step)
  return components, params, ckpt_step


def evaluate(config, workdir: str) -> dict:
  """bits/dim of the EMA params of the latest checkpoint (or the oracle) on eval.split.

  Per-image rows are appended to eval/per_image.jsonl after every batch; a rerun with the
  same settings keeps the finished batches and computes only the missing ones.
  """
  config = finalize_config(config)
  components, params, ckpt_step = model_for_eval(config, workdir)
  ensure_workdir(workdir)
  e = config.eval
  split = data_lib.load_split(config.data, e.split)
  images = split.images if e.num_images is None else split.images[:e.num_images]
  settings = eval_settings(config)
  log_prob = make_log_prob_fn(components.drift, components.schedule, components.num_levels,
                              settings)
  sde_fn = jax.jit(lambda p, k, key: components.loss_fn(p, k, key, False)[1].sde_nats())

  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  header = {"checkpoint_step": ckpt_step, "batch_size": e.batch_size, "seed": config.seed,
            "split": e.split, "dataset": split.name, "arch": config.model.arch}
  header.update(settings_report(settings, components.schedule))
  per_image = os.path.join(eval_dir, "per_image.jsonl")
  done = _load_partial(per_image, header)
  first_batch = len(done) // e.batch_size
  done = done[:first_batch * e.batch_size]  # a batch cut short by a kill is redone whole
  with open(per_image, "w") as f:
    f.write(json.dumps({"header": header}) + "\n")
    for row in done:
      f.write(json.dumps(row) + "\n")

  start = time.perf_counter()
  bar = _progress(len(images), len(done), "eval_bpd")
  try:
    for rows in evaluate_batches(log_prob, params, images, e.batch_size, eval_key(config),
                                 settings, components.dim, sde_fn, first_batch):
      with open(per_image, "a") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
      done.extend(rows)
      bar.update(len(rows))
      bar.set_postfix(bpd=f"{np.mean([r['bpd'] for r in done]):.4f}",
                      nfe=f"{rows[0]['nfe']:.0f}")
  finally:
    bar.close()

  report = dict(header)
  report.update(summarize(done))
  report.update({
      "dataset_version": split.version,
      "gamma_min": config.model.gamma_min,
      "gamma_u": config.eval.gamma_u if settings.dequantization == "u" else None,
      "wall_time_s": time.perf_counter() - start,
  })
  write_json(os.path.join(eval_dir, "bpd.json"), report)
  return report


def _load_partial(path: str, header: dict) -> list:
  """Rows of an earlier evaluation with the same settings (a resumed evaluation)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  if not lines:
    return []
  try:
    if json.loads(lines[0]).get("header") != header:
      return []
    for l in lines[1:]:
      rows.append(json.loads(l))
  except json.JSONDecodeError:
    pass  # a line cut by a kill: keep the rows before it
  rows.sort(key=lambda r: r["index"])
  return [r for i, r in enumerate(rows) if r["index"] == i]


# ----------------------------------------------------------------------------- sampling


def sample(config, workdir: str) -> str:
  """Draws config.sample.num_samples images; writes samples/grid.png, samples.npz, sample.json.

  Returns the path of grid.png. NFE per batch goes to samples.npz and sample.json.
  """
  from PIL import Image  # a dependency for the PNG grid only

  config = finalize_config(config)
  components, params, ckpt_step = model_for_eval(config, workdir)
  ensure_workdir(workdir)
  s = config.sample
  settings = sample_settings(config)
  d = config.data
  shape = (s.batch_size,) + data_lib.image_shape(d)
  sample_fn = make_sample_fn(components.drift, components.schedule, components.num_levels,
                             shape, settings)
  start = time.perf_counter()
  images, nfes = draw(sample_fn, params, _rng(config, "sample"), s.num_samples, s.batch_size)
  wall = time.perf_counter() - start

  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  grid = image_grid(images, components.num_levels)
  grid_path = os.path.join(out_dir, "grid.png")
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(grid_path)
  np.savez(os.path.join(out_dir, "samples.npz"), images=images, nfe=np.asarray(nfes),
           num_levels=components.num_levels)
  write_json(os.path.join(out_dir, "sample.json"), {
      "checkpoint_step": ckpt_step, "arch": config.model.arch, "num_samples": len(images),
      "decode": settings.decode, "solver": settings.solver.solver,
      "rtol": settings.solver.rtol, "atol": settings.solver.atol,
      "nfe_mean": float(np.mean(nfes)), "wall_time_s": wall})
  logging.info("wrote %d samples to %s (NFE %.0f per batch)", len(images), out_dir,
               np.mean(nfes))
  return grid_path
