"""Bits/dim of integer images under a diffusion ODE (docs/design.md, Bits/dim).

``make_log_prob_fn`` builds the per-batch bound; ``evaluate_batches`` runs it over a data
set batch by batch (the one evaluation loop, shared by ``run.evaluate`` and the Python
API) and ``summarize`` turns its rows into the report fields.

Pipeline per batch: dequantize (``dequantization.py``) -> solve the augmented ODE from
gamma_0 to gamma_max (``ode.py``) -> add the prior log N(x_1; 0, sigma_max^2 I) and the
dequantizer's log-weight -> importance-weight K samples -> bits/dim.

With K samples the bound is log (1/K) sum_k exp(b_k), i.e. logsumexp(b) - log K; dropping
the -log K would inflate the likelihood.

Several devices (``mesh``): each batch is one system solved under ``jax.jit`` with its
rows split over the mesh's devices, so XLA partitions the network and the diffrax loop
and the step-size control's error norm is a reduction over the whole batch: one step
sequence and one NFE for the batch, as on one device. The noise is drawn inside the
solve for the batch's global shape (partitionable threefry: the same numbers under any
sharding). A batch whose size is not a multiple of the device count is padded with
copies of its last row; the padding rows take no part in the error norm
(``ode.rows_rms_norm``) and are dropped from the results. On one device nothing of this
applies and the computation is the one-device program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffode_jax import ode, parallel
from diffode_jax import precision as precision_lib
from diffode_jax.dequantization import (DEFAULT_EVAL_DEQUANTIZATION, EVAL_DEQUANTIZATIONS,
                                        dequantize)
from diffode_jax.discretization import nats_to_bpd
from diffode_jax.schedules import Schedule
from diffode_jax.errors import LikelihoodError  # noqa: F401  (re-exported)

# Batch b of ``evaluate_batches`` draws with bkey = fold_in(key, b); its K dequantization
# samples use fold_in(bkey, i), i = 0..K-1, and its sde_bpd term uses fold_in(bkey,
# SDE_KEY_INDEX), an index no K reaches, so the two draws never share a key. Its value is
# part of every reported sde_bpd: keep it.
SDE_KEY_INDEX = 1 << 20


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How ``make_log_prob_fn`` bounds log P(k); the defaults are configs/default.py's.

  ``gamma_u`` (the start of the ODE for dequantization ``u``) depends on the bit depth,
  ``schedules.default_gamma_u(V)``; it has no default here and is required (not None)
  with ``dequantization='u'`` only (the config derives it when a run starts).
  ``precision`` is the matmul / convolution precision of the solve (``precision.py``);
  ``exact_trace_chunk`` the number of basis tangents per pass of the exact trace (None:
  all D in one vmap).
  """

  dequantization: str = DEFAULT_EVAL_DEQUANTIZATION
  num_importance: int = 1
  analytic_entropy: bool = False
  divergence: str = ode.DEFAULT_DIVERGENCE
  solver: ode.SolverConfig = ode.SolverConfig()
  gamma_u: float | None = None
  precision: str = precision_lib.DEFAULT_EVAL_PRECISION
  exact_trace_chunk: int | None = None

  def __post_init__(self):
    if self.dequantization not in EVAL_DEQUANTIZATIONS:
      raise ValueError(f"unknown dequantization {self.dequantization!r}; expected one of "
                       f"{EVAL_DEQUANTIZATIONS}")
    if self.dequantization == "u" and self.gamma_u is None:
      raise ValueError("dequantization='u' needs gamma_u (schedules.default_gamma_u(V) is "
                       "the default of the config)")
    if self.num_importance < 1:
      raise ValueError(f"num_importance must be >= 1, got {self.num_importance}")
    if self.analytic_entropy and (self.dequantization != "tn" or self.num_importance != 1):
      raise ValueError("analytic_entropy applies to dequantization='tn' with "
                       "num_importance=1 only")
    if self.divergence not in ode.DIVERGENCES:
      raise ValueError(f"unknown divergence {self.divergence!r}; expected one of "
                       f"{ode.DIVERGENCES}")
    precision_lib.check(self.precision, "eval.precision")
    chunk = self.exact_trace_chunk
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
      raise ValueError(f"eval.exact_trace_chunk must be None or an integer >= 1, got "
                       f"{chunk!r}")


def start_gamma(settings: EvalSettings, schedule: Schedule) -> float:
  """The gamma at which the ODE starts: gamma_u for ``u``, else gamma_min."""
  return float(settings.gamma_u if settings.dequantization == "u" else schedule.gamma_min)


def effective_solver(settings: EvalSettings, schedule: Schedule) -> ode.SolverConfig:
  """settings.solver with rtol and atol multiplied by ``ode.tolerance_scale``."""
  return ode.scaled_tolerances(settings.solver, start_gamma(settings, schedule))


def prior_log_density(x1, schedule: Schedule):
  """log N(x_1; 0, sigma_max^2 I) per example, natural log."""
  sigma1 = schedule.sigma(jnp.asarray(schedule.gamma_max, x1.dtype))
  dim = math.prod(x1.shape[1:])
  # Reshaped before squaring (not sum_per_example(x1**2)): XLA fuses the two orders into
  # differently rounded reductions, and this one is the order of the reported numbers.
  sq = (x1.reshape(x1.shape[0], -1) ** 2).sum(-1)
  return -0.5 * sq / sigma1**2 - dim * (jnp.log(sigma1) + 0.5 * math.log(2 * math.pi))


@dataclasses.dataclass
class Bound:
  """Per-image lower bounds on log P(k) (nats) and solver statistics."""

  log_prob: np.ndarray
  nfe: list
  success: bool


def _sharded(mesh, settings: EvalSettings) -> bool:
  """Whether a solve is split over mesh (the scipy host loop always runs on one device)."""
  return mesh is not None and mesh.size > 1 and settings.solver.solver != "scipy_rk45"


def make_log_prob_fn(drift: Callable, schedule: Schedule, num_levels: int,
                     settings: EvalSettings, mesh=None):
  """Returns log_prob(params, k, key, num_real=None) -> Bound for an integer batch k.

  ``drift(params, x, gamma)`` is the probability-flow drift of a batch at scalar gamma.
  Each of the K samples draws its own dequantization noise and divergence probe.

  With a ``mesh`` of several devices (see the module docstring) k must be a global batch
  over it (``place_batch``) whose first ``num_real`` rows are images and the rest
  padding, and params replicated over it; the bounds of the ``num_real`` rows come back
  on every process. Without one (or with one device) k is any array on one device.
  ``log_prob.solve`` is the jitted solve of one sample, (params, k, key, num_real) ->
  (bounds, nfe, ok), for inspecting what it compiles to.

  Caveat for K > 1 with a Hutchinson divergence: the importance-weighted bound needs
  unbiased estimates of p, but Hutchinson gives unbiased estimates of log p, so
  exp(noisy log p) is biased upward and the K-sample average may overstate the
  likelihood by an amount that grows with the probe variance. Use divergence='exact'
  (small images) to check; a warning is logged.
  """
  s = settings
  solver = effective_solver(s, schedule)
  sharded = _sharded(mesh, s)
  if s.num_importance > 1 and s.divergence != "exact":
    logging.warning("num_importance=%d with a %s (Hutchinson) divergence: the "
                    "importance-weighted bound can be biased upward by the estimator's "
                    "noise; check with divergence='exact' on small images",
                    s.num_importance, s.divergence)

  def prepare(k, key):
    k_deq, k_probe = jax.random.split(key)
    deq = dequantize(s.dequantization, k_deq, k, schedule, num_levels, s.gamma_u,
                     s.analytic_entropy)
    probe = ode.draw_probe(s.divergence, k_probe, k.shape)
    return deq, probe

  def finish(x1, delta, log_weight):
    return prior_log_density(x1, schedule) + delta + log_weight

  chunk = s.exact_trace_chunk
  if s.solver.solver == "scipy_rk45":
    prepare_jit = jax.jit(precision_lib.traced_with(s.precision, prepare))

    def field(gamma, state, args):  # one function for all solves: compiled once
      params, probe = args
      return ode.augmented_vector_field(lambda x, g: drift(params, x, g), probe, chunk)(
          gamma, state, None)

    field = precision_lib.traced_with(s.precision, field)

    def one_sample(params, k, key, num_real):
      del num_real  # one device: never padded
      deq, probe = prepare_jit(k, key)
      y0 = (deq.z0, jnp.zeros(k.shape[0], jnp.float32))
      (x1, delta), nfe, ok = ode.solve_scipy(field, y0, deq.gamma0, schedule.gamma_max,
                                             solver, args=(params, probe))
      return np.asarray(finish(jnp.asarray(x1), jnp.asarray(delta), deq.log_weight)), nfe, ok

    solve = None
  else:
    rows = parallel.batch_sharding(mesh) if sharded else None

    def solve_one(params, k, key, num_real):
      deq, probe = prepare(k, key)
      z0 = deq.z0
      if rows is not None:  # pin the solve's state to the batch split
        z0 = jax.lax.with_sharding_constraint(z0, rows)
        probe = None if probe is None else jax.lax.with_sharding_constraint(probe, rows)
      field = ode.augmented_vector_field(lambda x, g: drift(params, x, g), probe, chunk)
      y0 = (z0, jnp.zeros(k.shape[0], jnp.float32))
      norm = None if num_real is None else ode.rows_rms_norm(num_real)
      (x1, delta), nfe, ok = ode.solve_diffrax(field, y0, deq.gamma0, schedule.gamma_max,
                                               solver, norm)
      return finish(x1, delta, deq.log_weight), nfe, ok

    solve = jax.jit(precision_lib.traced_with(s.precision, solve_one), static_argnums=3,
                    out_shardings=parallel.replicated_sharding(mesh) if sharded else None)

    def one_sample(params, k, key, num_real):
      bound, nfe, ok = solve(params, k, key, num_real)
      return np.asarray(parallel.local_copy(bound)), int(nfe), bool(ok)

  def log_prob(params, k, key, num_real: int | None = None) -> Bound:
    rows_total = k.shape[0]
    if num_real is not None and num_real >= rows_total:
      num_real = None  # nothing padded
    if not sharded:
      k = jnp.asarray(k)
    samples, nfes, success = [], [], True
    for i in range(s.num_importance):
      bound, nfe, ok = one_sample(params, k, jax.random.fold_in(key, i), num_real)
      samples.append(bound if num_real is None else bound[:num_real])
      nfes.append(nfe)
      success = success and ok
    stacked = np.stack(samples).astype(np.float64)
    combined = _logmeanexp(stacked)
    return Bound(combined, nfes, success)

  log_prob.solve = solve
  log_prob.mesh = mesh if sharded else None
  return log_prob


def make_sde_fn(loss_fn: Callable, settings: EvalSettings, mesh=None):
  """sde(params, k, key, num_real=None) -> the VDM ELBO (nats) per image of k[:num_real].

  The ELBO terms use the training loss (no dropout) with its own noise and time draws;
  with a mesh k is a padded global batch as for ``make_log_prob_fn``, and the padding
  rows are dropped inside the jitted function (the time draws stratify over the real
  rows only, as on one device).
  """
  sharded = _sharded(mesh, settings)

  def sde(params, k, key, num_real):
    if num_real is not None:
      k = k[:num_real]
    return loss_fn(params, k, key, False)[1].sde_nats()

  jitted = jax.jit(precision_lib.traced_with(settings.precision, sde), static_argnums=3,
                   out_shardings=parallel.replicated_sharding(mesh) if sharded else None)

  def sde_fn(params, k, key, num_real: int | None = None):
    if num_real is not None and num_real >= k.shape[0]:
      num_real = None
    return np.asarray(parallel.local_copy(jitted(params, k, key, num_real)))

  return sde_fn


def place_batch(images, lo: int, hi: int, mesh=None):
  """(batch, num_real) of images[lo:hi] for a log_prob function over mesh.

  Without a mesh of several devices: the rows as a device array, num_real None. With
  one: a global array over the mesh, padded to a multiple of the device count with
  copies of row hi - 1 (each process reading only its own devices' rows), and
  num_real = hi - lo.
  """
  if mesh is None or mesh.size == 1:
    return jnp.asarray(images[lo:hi]), None
  rows = np.arange(lo, hi)
  padded = parallel.padded_size(len(rows), mesh)
  rows = np.concatenate([rows, np.full(padded - len(rows), hi - 1, rows.dtype)])
  return parallel.place_rows(images, rows, mesh), hi - lo


def process_rows(num_images: int, batch_size: int, mesh) -> np.ndarray:
  """The sorted distinct indices of images[:num_images] that this process's devices read
  over a whole ``evaluate_batches`` loop (``place_batch``'s layout: each batch padded with
  copies of its last row, split over the mesh): what a process of a multi-host evaluation
  needs to load."""
  sharding = parallel.batch_sharding(mesh)
  held = []
  for lo in range(0, num_images, batch_size):
    hi = min(lo + batch_size, num_images)
    rows = np.arange(lo, hi)
    padded = parallel.padded_size(len(rows), mesh)
    rows = np.concatenate([rows, np.full(padded - len(rows), hi - 1, rows.dtype)])
    for index in sharding.addressable_devices_indices_map((padded,)).values():
      held.append(rows[index[0]])
  return np.unique(np.concatenate(held)) if held else np.zeros(0, np.int64)


def _logmeanexp(a):
  """log (1/K) sum_k exp(a_k) over the leading axis, in float64."""
  top = a.max(axis=0)
  return top + np.log(np.mean(np.exp(a - top), axis=0))


def bits_per_dim(log_prob, dim: int):
  """-log P / (D ln 2) elementwise."""
  return nats_to_bpd(-np.asarray(log_prob), dim)


def check_bound(bound: Bound, settings: EvalSettings):
  """Raises LikelihoodError if the solver failed or the numbers are not finite."""
  if not bound.success:
    raise LikelihoodError(
        f"the ODE solver did not reach gamma_max within max_steps="
        f"{settings.solver.max_steps} (rtol={settings.solver.rtol}, "
        f"atol={settings.solver.atol}); raise eval.max_steps or loosen the tolerances")
  if not np.all(np.isfinite(bound.log_prob)):
    raise LikelihoodError("the likelihood is not finite (NaN or Inf in the ODE solve)")


def settings_report(settings: EvalSettings, schedule: Schedule) -> dict:
  """The settings fields of a report (eval/bpd.json and the Python API).

  rtol and atol are the configured ones; the solver ran with them times ode.tolerance_scale.
  """
  return {"dequantization": settings.dequantization,
          "num_importance": settings.num_importance,
          "analytic_entropy": settings.analytic_entropy,
          "divergence": settings.divergence, "solver": settings.solver.solver,
          "rtol": settings.solver.rtol, "atol": settings.solver.atol,
          "tolerance_scale": ode.tolerance_scale(start_gamma(settings, schedule)),
          "precision": settings.precision}


def evaluate_batches(log_prob_fn, params, images, batch_size: int, key, settings: EvalSettings,
                     dim: int, sde_fn=None, first_batch: int = 0):
  """Yields the per-image rows of images[first_batch * batch_size:], one batch at a time.

  Batch b uses the key ``fold_in(key, b)``, so a resumed loop (first_batch > 0) draws
  exactly the noise an uninterrupted one would. Each row holds ``index``, ``log_prob``
  (nats, the lower bound on log P(k)), ``bpd`` and ``nfe`` (mean over the K samples), and
  ``sde_bpd`` when ``sde_fn`` (``make_sde_fn``) is given. Raises LikelihoodError on a
  solver failure or a non-finite bound.

  With a log_prob_fn over a mesh of several devices (``make_log_prob_fn(..., mesh)``),
  params are replicated over it once, every process runs the loop, each placing only its
  own devices' rows of every batch (``place_batch``), and every process gets every row.
  """
  mesh = getattr(log_prob_fn, "mesh", None)
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
    if sde_fn is not None:
      sde_key = jax.random.fold_in(bkey, SDE_KEY_INDEX)
      sde = bits_per_dim(-np.asarray(sde_fn(params, k, sde_key, num_real)), dim)
      for row, value in zip(rows, sde):
        row["sde_bpd"] = float(value)
    yield rows


def _mean_and_stderr(values):
  values = np.asarray(values, np.float64)
  stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
  return float(values.mean()), float(stderr)


def summarize(rows) -> dict:
  """Mean and standard error of bpd (and sde_bpd when present), mean NFE, image count."""
  out = {"num_images": len(rows)}
  out["bpd"], out["bpd_stderr"] = _mean_and_stderr([r["bpd"] for r in rows])
  if rows and "sde_bpd" in rows[0]:
    out["sde_bpd"], out["sde_bpd_stderr"] = _mean_and_stderr([r["sde_bpd"] for r in rows])
  out["nfe_mean"] = float(np.mean([r["nfe"] for r in rows]))
  return out
