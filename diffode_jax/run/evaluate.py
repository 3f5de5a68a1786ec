"""``--mode=eval_bpd``: bits/dim of a checkpoint's EMA params (or the oracle) on eval.split,
written under its own name, eval/<name>/per_image.jsonl batch by batch (resumable) and
eval/<name>/bpd.json, listed in eval/index.json; eval/bpd.json and eval/per_image.jsonl are
the latest finished evaluation's (docs/evaluation.md, Per-image results).

Every device of every process takes part: each batch of ``eval.batch_size`` images is
split over the data-parallel mesh (``likelihood.py``), each process placing only its own
devices' rows, and every process gets every row back. Process 0 alone reads and writes
eval/: it decides where a resumed evaluation starts and tells the others.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from diffode_jax import data as data_lib
from diffode_jax import keys, parallel, paths, storage
from diffode_jax.trained import restore_for_eval
from diffode_jax.config import eval_settings, finalize_config, reconcile_with_workdir
from diffode_jax.errors import DataError, WorkdirError, warn
from diffode_jax.fingerprint import images_fingerprint, params_fingerprint
from diffode_jax.evaluation import START_PERTURBATION, evaluate_batches
from diffode_jax.likelihood import EvalSettings, LogProbFn, make_log_prob_fn, make_sde_fn
from diffode_jax.model import Components
from diffode_jax.placement import process_rows
from diffode_jax.report import bpd_report, devices_fields, run_fields, sensitivity_warning
from diffode_jax.run import eval_rows
from diffode_jax.run import workdir as workdir_lib
from diffode_jax.run.console import progress
from diffode_jax.run.lock import WorkdirLock, acquire_on_chief


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             command_line_fields: set[str] | None = None) -> dict:
  """bits/dim of the EMA params of the latest checkpoint (or the oracle) on eval.split.

  What defines the model comes from the workdir's config.json (``command_line_fields``: the fields
  set on the command line, which may not contradict it; None: all of them). Each
  evaluation has its own directory eval/<name>/ (``eval_rows.evaluation_name``: its
  settings and a digest of every row-changing field, the header: model, checkpoint,
  settings, batch size, seed, images); per-image rows are appended there after every
  batch, and a rerun of the same evaluation keeps the finished batches and computes only
  the missing ones. One evaluation per workdir at a time (eval/.lock). Returns the report,
  written to eval/<name>/bpd.json and, as the latest, eval/bpd.json.
  """
  config = model_config(config, workdir, command_line_fields)
  if eval_settings(config).solver.solver != "scipy_rk45":  # the host loop: one device
    parallel.check_batch(config.eval.batch_size, "eval.batch_size")
  damaged: list[int] = []
  components, params, ckpt_step = restore_for_eval(config, workdir, damaged=damaged)
  workdir_lib.ensure(workdir)
  lock = WorkdirLock(paths.eval_lock_path(workdir), "eval_bpd",
                     enabled=jax.process_index() == 0)
  acquire_on_chief(lock)
  try:
    return _evaluate_model(config, workdir, components, params, ckpt_step, damaged)
  finally:
    lock.release()


def model_config(config: ml_collections.ConfigDict, workdir: str,
                 command_line_fields: set[str] | None = None) -> ml_collections.ConfigDict:
  """The finalized config with the fields that define the trained model taken from the
  workdir's config.json, when it has one (``config.reconcile_with_workdir``)."""
  config = finalize_config(config)
  if config.model.arch == "oracle":
    return config
  saved = workdir_lib.saved_config(workdir)
  if saved is None:
    return config
  return finalize_config(reconcile_with_workdir(config, saved, command_line_fields))


def _load_eval_split(config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh | None) -> data_lib.ImageData:
  """eval.split; with several processes each loads only the rows its devices evaluate
  (``placement.process_rows``). Process 0 loads first (it may prepare a tfds data set);
  a DataError on any process stops every process (the others with a line naming it)."""
  e = config.eval
  select = None
  if mesh is not None and jax.process_count() > 1:
    def select(n):
      return process_rows(n if e.num_images is None else min(n, e.num_images),
                          e.batch_size, mesh)
  split, error = None, None
  try:
    split = parallel.chief_first(lambda: data_lib.load_split(config.data, e.split, select),
                                 "diffode_jax: data eval prepared", (DataError,))
  except DataError as err:
    error = err
  if parallel.on_any_process(error is not None) or split is None:
    raise error or DataError(f"another process could not load eval.split={e.split!r} "
                             "(its error is in that process's output)")
  if isinstance(split.images, data_lib.RowSubset):
    evaluated = len(split.images) if e.num_images is None else min(len(split.images),
                                                                    e.num_images)
    print(f"eval_bpd: process {jax.process_index()} of {jax.process_count()} loaded "
          f"{len(split.images.local)} of the {evaluated} images of {split.name}/{e.split}",
          file=sys.stderr, flush=True)
  return split


def _evaluate_model(config: ml_collections.ConfigDict, workdir: str, components: Components,
                    params: Any, ckpt_step: int | None, damaged: list[int]) -> dict:
  e = config.eval
  settings = eval_settings(config)
  mesh = parallel.make_mesh()
  log_prob = make_log_prob_fn(components.drift, components.schedule, components.num_levels,
                              settings, mesh)
  split = _load_eval_split(config, mesh if log_prob.mesh is not None else None)
  images = split.images if e.num_images is None else split.images[:e.num_images]
  sde_fn = make_sde_fn(components.loss_fn, settings, mesh)
  perturbed = (make_log_prob_fn(components.drift, components.schedule, components.num_levels,
                                settings, mesh, start_perturbation=START_PERTURBATION)
               if e.reproducibility_check else None)
  num_devices = mesh.size if log_prob.mesh is not None else 1

  fields = run_fields(config, settings, components.schedule, ckpt_step, e.batch_size)
  fields["params_fingerprint"] = params_fingerprint(params)
  if damaged:
    fields["damaged_checkpoints"] = sorted(damaged)
  data_fields = {"split": e.split, "dataset": split.name, "dataset_version": split.version,
                 "images_fingerprint": images_fingerprint(images)}
  try:
    return _evaluate_and_write(config, workdir, log_prob, params, images, settings,
                               components, sde_fn, fields, data_fields, num_devices, perturbed)
  except OSError as err:  # a full disk or a read-only workdir, on any write of eval/
    raise WorkdirError(f"cannot write the evaluation to {paths.eval_dir(workdir)}: "
                       f"{storage.describe(err)}; the batches written before are kept, "
                       f"rerun to resume") from None


def _evaluate_and_write(config: ml_collections.ConfigDict, workdir: str, log_prob: LogProbFn,
                        params: Any, images: np.ndarray | data_lib.RowSubset,
                        settings: EvalSettings, components: Components,
                        sde_fn: Callable[..., np.ndarray], fields: dict, data_fields: dict,
                        num_devices: int,
                        perturbed_log_prob_fn: LogProbFn | None = None) -> dict:
  e = config.eval
  is_chief = jax.process_index() == 0
  evaluations = eval_rows.Evaluations(workdir)
  first_batch = 0
  per_image = None  # process 0's rows file
  if is_chief:
    first_batch = evaluations.start({**fields, **data_fields}, len(images), e.batch_size)
    per_image = evaluations.rows
  first_batch = parallel.broadcast_from_chief(first_batch)

  start = time.perf_counter()
  bar = progress(len(images), min(first_batch * e.batch_size, len(images)), "eval_bpd")
  try:
    for rows in evaluate_batches(log_prob, params, images, e.batch_size,
                                 keys.eval_key(config), settings, components.dim, sde_fn,
                                 first_batch, perturbed_log_prob_fn):
      bar.update(len(rows))
      if per_image is not None:
        per_image.add(rows)
        done = per_image.rows
        bar.set_postfix(bpd=f"{np.mean([r['bpd'] for r in done]):.4f}",
                        nfe=f"{rows[0]['nfe']:.0f}")
  finally:
    bar.close()

  if per_image is not None:
    report = bpd_report(fields, per_image.rows, time.perf_counter() - start,
                        **data_fields, **devices_fields(num_devices, jax.process_count()))
    evaluations.finish(report)
    report = {**report, "evaluation": evaluations.name}
    message = sensitivity_warning(report.get("start_sensitivity"), settings.solver)
    if message:
      warn(message)
  parallel.sync("diffode_jax: eval written")
  if not is_chief:  # the report process 0 wrote (the workdir is shared)
    report = json.loads(storage.read_text(paths.eval_report_path(workdir)))
  return report
