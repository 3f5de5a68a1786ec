"""``--mode=eval_bpd``: bits/dim of a checkpoint's EMA params (or the oracle) on eval.split,
written to eval/per_image.jsonl batch by batch (resumable) and eval/bpd.json (SPEC 5, 8)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from diffode_jax import data as data_lib
from diffode_jax import keys, paths
from diffode_jax.checkpoint import restore_for_eval
from diffode_jax.config import eval_settings, finalize_config
from diffode_jax.likelihood import evaluate_batches, make_log_prob_fn
from diffode_jax.report import bpd_report, run_fields
from diffode_jax.run import workdir as workdir_lib
from diffode_jax.run.console import progress


def evaluate(config, workdir: str) -> dict:
  """bits/dim of the EMA params of the latest checkpoint (or the oracle) on eval.split.

  Per-image rows are appended to eval/per_image.jsonl after every batch; a rerun with the
  same settings keeps the finished batches and computes only the missing ones. Returns
  the report written to eval/bpd.json.
  """
  config = finalize_config(config)
  components, params, ckpt_step = restore_for_eval(config, workdir)
  workdir_lib.ensure(workdir)
  e = config.eval
  split = data_lib.load_split(config.data, e.split)
  images = split.images if e.num_images is None else split.images[:e.num_images]
  settings = eval_settings(config)
  log_prob = make_log_prob_fn(components.drift, components.schedule, components.num_levels,
                              settings)
  sde_fn = jax.jit(lambda p, k, key: components.loss_fn(p, k, key, False)[1].sde_nats())

  fields = run_fields(config, settings, components.schedule, ckpt_step, e.batch_size)
  data_fields = {"split": e.split, "dataset": split.name, "dataset_version": split.version}
  per_image = workdir_lib.PerImageRows(workdir)
  first_batch = per_image.start({**fields, **data_fields}, len(images), e.batch_size)

  start = time.perf_counter()
  bar = progress(len(images), len(per_image.rows), "eval_bpd")
  try:
    for rows in evaluate_batches(log_prob, params, images, e.batch_size,
                                 keys.eval_key(config), settings, components.dim, sde_fn,
                                 first_batch):
      per_image.add(rows)
      bar.update(len(rows))
      bar.set_postfix(bpd=f"{np.mean([r['bpd'] for r in per_image.rows]):.4f}",
                      nfe=f"{rows[0]['nfe']:.0f}")
  finally:
    bar.close()

  report = bpd_report(fields, per_image.rows, time.perf_counter() - start, **data_fields)
  workdir_lib.write_json(os.path.join(paths.eval_dir(workdir), "bpd.json"), report)
  return report
