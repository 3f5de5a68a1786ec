"""The evaluation loop: the per-image rows of a data set, batch by batch (the one loop,
shared by ``run.evaluate``, periodic evaluation in training and the Python API).

Batch b draws with bkey = fold_in(key, b); its K dequantization samples use
fold_in(bkey, i), i = 0..K-1 (``likelihood.LogProbFn``), and its sde_bpd term uses
fold_in(bkey, SDE_KEY_INDEX), an index no K reaches (the table in ``keys.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from diffode_jax import parallel
from diffode_jax.errors import LikelihoodError
from diffode_jax.keys import SDE_KEY_INDEX
from diffode_jax.likelihood import Bound, EvalSettings, LogProbFn, bits_per_dim
from diffode_jax.placement import place_batch

if TYPE_CHECKING:
  from diffode_jax.data.spec import RowSubset

PyTree = Any

# The reproducibility check moves every component of z0 by this much (one float32
# rounding step of a value of order 1).
START_PERTURBATION = 1e-7


def check_bound(bound: Bound, settings: EvalSettings) -> None:
  """Raises LikelihoodError if the solver failed or the numbers are not finite."""
  if not bound.success:
    raise LikelihoodError(
        f"the ODE solver did not reach gamma_max within max_steps="
        f"{settings.solver.max_steps} (rtol={settings.solver.rtol}, "
        f"atol={settings.solver.atol}); raise eval.max_steps or loosen the tolerances")
  if not np.all(np.isfinite(bound.log_prob)):
    raise LikelihoodError("the likelihood is not finite (NaN or Inf in the ODE solve)")


def evaluate_batches(log_prob_fn: LogProbFn, params: PyTree, images: np.ndarray | RowSubset,
                     batch_size: int, key: jax.Array, settings: EvalSettings, dim: int,
                     sde_fn: Callable[..., np.ndarray] | None = None,
                     first_batch: int = 0,
                     perturbed_log_prob_fn: LogProbFn | None = None) -> Iterator[list[dict]]:
  """Yields the per-image rows of images[first_batch * batch_size:], one batch at a time.

  Batch b uses the key ``fold_in(key, b)``, so a resumed loop (first_batch > 0) draws
  exactly the noise an uninterrupted one would. Each row holds ``index``, ``log_prob``
  (nats, the lower bound on log P(k)), ``bpd`` and ``nfe`` (mean over the K samples), and
  ``sde_bpd`` when ``sde_fn`` (``likelihood.make_sde_fn``) is given. Raises LikelihoodError on a
  solver failure or a non-finite bound.

  With a log_prob_fn over a mesh of several devices (``likelihood.make_log_prob_fn(..., mesh)``),
  params are replicated over it once, every process runs the loop, each placing only its
  own devices' rows of every batch (``place_batch``), and every process gets every row.

  The reproducibility check: with ``perturbed_log_prob_fn`` (the same bound from a moved
  start, ``make_log_prob_fn(..., start_perturbation=START_PERTURBATION)``) batch 0 is solved
  again with it and its rows get ``start_sensitivity_bpd``, how far each bound moved
  (``report.start_sensitivity`` summarizes it; docs/evaluation.md, Reproducibility).
  """
  mesh = log_prob_fn.mesh
  if mesh is not None:
    params = parallel.replicate(parallel.local_copy(params),
                                parallel.replicated_sharding(mesh))
  num_batches = -(-len(images) // batch_size)
  for b in range(first_batch, num_batches):
    lo, hi = b * batch_size, min((b + 1) * batch_size, len(images))
    k, num_real = place_batch(images, lo, hi, mesh)
    bkey = jax.random.fold_in(key, b)
    bound = log_prob_fn(params, k, bkey, num_real)
    check_bound(bound, settings)
    bpd = bits_per_dim(bound.log_prob, dim)
    rows = [{"index": lo + i, "log_prob": float(bound.log_prob[i]), "bpd": float(bpd[i]),
             "nfe": float(np.mean(bound.nfe))} for i in range(hi - lo)]
    if perturbed_log_prob_fn is not None and b == 0:
      moved = perturbed_log_prob_fn(params, k, bkey, num_real)
      check_bound(moved, settings)
      change = np.abs(bits_per_dim(moved.log_prob, dim) - bpd)
      for row, value in zip(rows, change):
        row["start_sensitivity_bpd"] = float(value)
    if sde_fn is not None:
      sde_key = jax.random.fold_in(bkey, SDE_KEY_INDEX)
      sde = bits_per_dim(-np.asarray(sde_fn(params, k, sde_key, num_real)), dim)
      for row, value in zip(rows, sde):
        row["sde_bpd"] = float(value)
    yield rows
