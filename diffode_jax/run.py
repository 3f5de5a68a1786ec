"""The loops: the only place with I/O, logging, progress bars and workdir files (SPEC 8).

Workdir layout:

    config.json            the finalized config of the run
    checkpoints/           orbax, one folder per step; rerunning train resumes the latest
    metrics.jsonl          one JSON object per logged step
    tensorboard/           TensorBoard events
    eval/bpd.json          evaluation report (SPEC 5 fields + checkpoint step)
    eval/per_image.jsonl   per-image bits/dim, appended batch by batch (resumable)
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
from diffode_jax.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from diffode_jax.likelihood import bits_per_dim, check_bound, make_log_prob_fn
from diffode_jax.model import build, eval_settings, finalize_config
from diffode_jax.train_state import (create_train_state, learning_rate_schedule,
                                     make_optimizer, make_train_step)


class TrainingError(RuntimeError):
  """Training cannot go on (NaN loss, bad setup); shown to the user as one line."""


# ----------------------------------------------------------------------------- helpers


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return Mesh(np.array(jax.devices()), ("data",))


def check_batch(batch_size: int, what: str) -> None:
  n = jax.device_count()
  if batch_size % n:
    raise TrainingError(f"{what}={batch_size} is not divisible by the {n} devices")


def global_batch(local: np.ndarray, mesh: Mesh):
  """Assembles the global batch array from this process's slice."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


def ensure_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
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


def init_state(config, components, optimizer):
  params = components.init_params(_rng(config, "init"))
  return create_train_state(params, optimizer)


def restore_for_eval(config, workdir: str, components, step=None):
  """(EMA params, step) of a checkpoint; CheckpointError if there is none or it mismatches."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoints in {directory}: train first (--mode=train)")
  ckpt = Checkpointer(directory, create=False)
  try:
    optimizer = make_optimizer(config.training)
    template = jax.eval_shape(lambda: init_state(config, components, optimizer))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    state = ckpt.restore(template, step)
    return state.ema_params, int(state.step)
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------- training


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in workdir; returns the last logged metrics."""
  config = finalize_config(config)
  ensure_workdir(workdir)
  t = config.training
  check_batch(t.batch_size, "training.batch_size")
  train_data = data_lib.load_split(config.data, "train")
  components = build(config)
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  optimizer = make_optimizer(t)
  total = int(t.num_steps) * max(int(t.grad_accum_steps), 1)

  ckpt = Checkpointer(checkpoint_dir(workdir), keep=t.keep_checkpoints)
  state = init_state(config, components, optimizer)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    logging.info("resumed from step %d", int(state.step))
  elif t.init_from:
    params, ema, step = _load_init_from(config, t.init_from, components)
    state = create_train_state(params, optimizer).replace(ema_params=ema)
    logging.info("initialized from %s (step %d)", t.init_from, step)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
  state = jax.device_put(state, replicated)

  train_step = jax.jit(make_train_step(components.loss_fn, optimizer, t.ema_decay,
                                       components.dim), donate_argnums=0)
  train_key = _rng(config, "train")
  lr_schedule = learning_rate_schedule(t)
  writer = _MetricsWriter(workdir) if jax.process_index() == 0 else None
  stop = _StopSignal()
  step = int(state.step)
  last_saved = step
  pending, last_row = [], {}
  tic, tic_step = time.perf_counter(), step
  bar = _progress(total, step, "train")
  try:
    while step < total:
      local = data_lib.host_batch(train_data, t.batch_size, step, config.seed,
                                  jax.process_index(), jax.process_count())
      batch = global_batch(local, mesh)
      state, metrics = train_step(state, batch, jax.random.fold_in(train_key, step))
      pending.append(metrics)
      step += 1
      bar.update(1)
      if step % t.log_every == 0 or step == total:
        row = _reduce(pending, step)
        pending = []
        _check_finite(row, step, last_saved)
        now = time.perf_counter()
        row["steps_per_sec"] = (step - tic_step) / max(now - tic, 1e-9)
        row["learning_rate"] = float(lr_schedule(step // max(int(t.grad_accum_steps), 1)))
        tic, tic_step = now, step
        bar.set_postfix(loss_bpd=f"{row['loss']:.4f}", sde_bpd=f"{row['sde_bpd']:.3f}")
        if writer:
          writer.write(row)
        last_row = row
      if step % t.checkpoint_every == 0 or step == total or stop.requested:
        if pending:
          _check_finite(_reduce(pending, step), step, last_saved)
        ckpt.save(step, state)
        last_saved = step
        if stop.requested:
          logging.warning("stopped by signal at step %d after saving a checkpoint", step)
          break
  finally:
    bar.close()
    stop.restore()
    ckpt.close()
    if writer:
      writer.close()
  return last_row


def _load_init_from(config, source: str, components):
  """(params, ema_params, step) of another run's latest checkpoint."""
  workdir = os.path.dirname(source.rstrip("/")) if os.path.basename(
      source.rstrip("/")) == "checkpoints" else source
  optimizer = make_optimizer(config.training)
  template = jax.eval_shape(lambda: init_state(config, components, optimizer))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"training.init_from: no checkpoints in {directory}")
  ckpt = Checkpointer(directory, create=False)
  try:
    state = ckpt.restore(template)
  finally:
    ckpt.close()
  return state.params, state.ema_params, int(state.step)


def _reduce(pending, step):
  stacked = jax.device_get(pending)
  row = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
  row["step"] = step
  return row


def _check_finite(row, step, last_saved):
  bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    raise TrainingError(
        f"non-finite {', '.join(sorted(bad))} before step {step}; stopped, the last good "
        f"checkpoint (step {last_saved}) is kept")


class _MetricsWriter:
  """metrics.jsonl (appended, flushed per row) and TensorBoard scalars."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.file = open(self.path, "a")
    try:
      from flax.metrics import tensorboard

      self.tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
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


def evaluate(config, workdir: str) -> dict:
  """bits/dim of the EMA params of the latest checkpoint on config.eval.split."""
  config = finalize_config(config)
  ensure_workdir(workdir)
  components = build(config)
  params, ckpt_step = restore_for_eval(config, workdir, components)
  e = config.eval
  split = data_lib.load_split(config.data, e.split)
  images = split.images if e.num_images is None else split.images[:e.num_images]
  settings = eval_settings(config)
  log_prob = make_log_prob_fn(components.drift, components.schedule, components.num_levels,
                              settings)
  sde_fn = jax.jit(lambda p, k, key: components.loss_fn(p, k, key, False)[1].sde_nats())

  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  header = {"checkpoint_step": ckpt_step, "dequantization": settings.dequantization,
            "num_importance": settings.num_importance, "solver": settings.solver.solver,
            "rtol": settings.solver.rtol, "atol": settings.solver.atol,
            "divergence": settings.divergence, "batch_size": e.batch_size,
            "analytic_entropy": settings.analytic_entropy, "seed": config.seed,
            "split": e.split}
  done = _load_partial(os.path.join(eval_dir, "per_image.jsonl"), header)
  per_image = os.path.join(eval_dir, "per_image.jsonl")
  with open(per_image, "w") as f:
    f.write(json.dumps({"header": header}) + "\n")
    for row in done:
      f.write(json.dumps(row) + "\n")

  key = _rng(config, "eval")
  num_batches = -(-len(images) // e.batch_size)
  start = time.perf_counter()
  bar = _progress(len(images), len(done), "eval_bpd")
  try:
    for b in range(num_batches):
      lo, hi = b * e.batch_size, min((b + 1) * e.batch_size, len(images))
      if hi <= len(done):
        continue
      k = jnp.asarray(images[lo:hi])
      bkey = jax.random.fold_in(key, b)
      bound = log_prob(params, k, bkey)
      check_bound(bound, settings)
      bpd = bits_per_dim(bound.log_prob, components.dim)
      sde = bits_per_dim(-np.asarray(sde_fn(params, k, jax.random.fold_in(bkey, 1 << 20))),
                         components.dim)
      rows = [{"index": lo + i, "bpd": float(bpd[i]), "sde_bpd": float(sde[i]),
               "nfe": float(np.mean(bound.nfe))} for i in range(hi - lo)]
      with open(per_image, "a") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
      done.extend(rows)
      bar.update(hi - lo)
      bar.set_postfix(bpd=f"{np.mean([r['bpd'] for r in done]):.4f}")
  finally:
    bar.close()

  bpds = np.array([r["bpd"] for r in done])
  sdes = np.array([r["sde_bpd"] for r in done])
  report = dict(header)
  report.update({
      "bpd": float(bpds.mean()),
      "bpd_stderr": float(bpds.std(ddof=1) / math.sqrt(len(bpds))) if len(bpds) > 1 else 0.0,
      "sde_bpd": float(sdes.mean()),
      "sde_bpd_stderr": float(sdes.std(ddof=1) / math.sqrt(len(sdes))) if len(sdes) > 1 else 0.0,
      "nfe_mean": float(np.mean([r["nfe"] for r in done])),
      "num_images": int(len(bpds)),
      "dataset": split.name,
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
