"""Bits/dim of integer images under a diffusion ODE: the bound of one batch (docs/design.md,
Bits/dim).

``make_log_prob_fn`` builds the per-batch bound, a ``LogProbFn``; ``make_sde_fn`` the VDM
ELBO of the same batch. The loop over a data set is ``evaluation.evaluate_batches``; how a
batch is split over devices, ``placement.py``; the report of the rows, ``report.py``.

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
copies of its last row (``placement.place_batch``); the padding rows take no part in the
error norm (``ode.error_norm``) and are dropped from the results. On one device
nothing of this applies and the computation is the one-device program.

Solver backends (``BACKENDS``): the diffrax solvers run on device under ``jax.jit`` and
can be split over a mesh; ``scipy_rk45`` (the official evaluator's host loop) runs on one
device, each network evaluation jitted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffode_jax import ode, parallel
from diffode_jax import precision as precision_lib
from diffode_jax.dequantization import (DEFAULT_EVAL_DEQUANTIZATION, EVAL_DEQUANTIZATIONS,
                                        dequantize)
from diffode_jax.discretization import nats_to_bpd
from diffode_jax.errors import LikelihoodError  # noqa: F401  (re-exported)
from diffode_jax.errors import warn
from diffode_jax.keys import PERTURBATION_KEY_INDEX
from diffode_jax.schedules import Schedule

PyTree = Any
# drift(params, x, gamma) -> dx/dgamma of a batch x at a scalar gamma.
ParamsDrift = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
# One importance sample of a batch: (params, k, key, num_real) -> (bounds (nats) of the
# real rows as NumPy, NFE, whether the solver reached gamma_max).
SampleFn = Callable[[PyTree, jax.Array, jax.Array, "int | None"], "tuple[np.ndarray, int, bool]"]


# The evaluation default: dopri5 at rtol = atol = 1e-5, the official loop's accuracy on
# every model bench/solver_study.py measured (bosh3 at 1e-4 needs half the NFE on the
# digits but is 0.8 bits/dim low on 8-bit photo tiles: docs/evaluation.md).
DEFAULT_EVAL_SOLVER = ode.SolverConfig()


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
  solver: ode.SolverConfig = DEFAULT_EVAL_SOLVER
  gamma_u: float | None = None
  precision: str = precision_lib.DEFAULT_EVAL_PRECISION
  exact_trace_chunk: int | None = None

  def __post_init__(self) -> None:
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
  if settings.dequantization == "u" and settings.gamma_u is not None:  # checked at init
    return float(settings.gamma_u)
  return float(schedule.gamma_min)


def effective_solver(settings: EvalSettings, schedule: Schedule) -> ode.SolverConfig:
  """settings.solver with rtol and atol multiplied by ``ode.tolerance_scale``."""
  return ode.scaled_tolerances(settings.solver, start_gamma(settings, schedule))


def prior_log_density(x1: jax.Array, schedule: Schedule) -> jax.Array:
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
  nfe: list[int]
  success: bool


@dataclasses.dataclass(frozen=True)
class LogProbFn:
  """The bound of a batch: ``fn(params, k, key, num_real=None) -> Bound``.

  ``sample`` solves one of the K importance samples; ``solve`` is the jitted solve behind
  it (params, k, key, num_real) -> (bounds, nfe, ok), for inspecting what it compiles to
  (None for the host loop); ``mesh`` is the mesh the solves are split over (None on one
  device); ``settings`` what the bound was built with.
  """
  sample: SampleFn
  settings: EvalSettings
  mesh: jax.sharding.Mesh | None = None
  solve: Callable[..., Any] | None = None

  def __call__(self, params: PyTree, k: jax.Array, key: jax.Array,
               num_real: int | None = None) -> Bound:
    if num_real is not None and num_real >= k.shape[0]:
      num_real = None  # nothing padded
    if self.mesh is None:
      k = jnp.asarray(k)
    samples, nfes, success = [], [], True
    for i in range(self.settings.num_importance):
      bound, nfe, ok = self.sample(params, k, jax.random.fold_in(key, i), num_real)
      samples.append(bound if num_real is None else bound[:num_real])
      nfes.append(nfe)
      success = success and ok
    return Bound(logmeanexp(np.stack(samples).astype(np.float64)), nfes, success)


@dataclasses.dataclass(frozen=True)
class _Parts:
  """What every backend needs: the drawing of the noise and the end of the bound."""
  prepare: Callable[[jax.Array, jax.Array], tuple[Any, jax.Array | None]]
  finish: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  drift: ParamsDrift
  schedule: Schedule
  solver: ode.SolverConfig
  settings: EvalSettings


def _on_host(parts: _Parts, mesh: jax.sharding.Mesh | None) -> LogProbFn:
  """scipy's RK45 on the host (the official evaluator's loop), each evaluation jitted."""
  s = parts.settings
  prepare_jit = jax.jit(precision_lib.traced_with(s.precision, parts.prepare))

  def field(gamma, state, args):  # one function for all solves: compiled once
    params, probe = args
    return ode.augmented_vector_field(lambda x, g: parts.drift(params, x, g), probe,
                                      s.exact_trace_chunk)(gamma, state, None)

  field = precision_lib.traced_with(s.precision, field)

  def sample(params: PyTree, k: jax.Array, key: jax.Array,
             num_real: int | None) -> tuple[np.ndarray, int, bool]:
    del num_real  # one device: never padded
    deq, probe = prepare_jit(k, key)
    y0 = (deq.z0, jnp.zeros(k.shape[0], jnp.float32))
    (x1, delta), nfe, ok = ode.solve_scipy(field, y0, deq.gamma0, parts.schedule.gamma_max,
                                           parts.solver, args=(params, probe))
    return (np.asarray(parts.finish(jnp.asarray(x1), jnp.asarray(delta), deq.log_weight)),
            nfe, ok)

  return LogProbFn(sample, s)


def solve_sample(parts: _Parts, params: PyTree, k: jax.Array, key: jax.Array,
                 num_real: int | None = None, rows: jax.sharding.Sharding | None = None,
                 dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One importance sample of the bound on device, traceable: (bounds (N,), nfe, ok).

  The noise of ``parts.prepare``, the augmented field, a diffrax solve from gamma0 to
  gamma_max and ``parts.finish``. ``rows``: a sharding the state is pinned to (the batch
  split over devices); ``dtype``: the float type of the solve (the evaluator's float32,
  or float64 for ``differentiable.py`` under jax_enable_x64).
  """
  deq, probe = parts.prepare(k, key)
  z0 = deq.z0.astype(dtype)
  probe = None if probe is None else probe.astype(dtype)
  if rows is not None:  # pin the solve's state to the batch split
    z0 = jax.lax.with_sharding_constraint(z0, rows)
    probe = None if probe is None else jax.lax.with_sharding_constraint(probe, rows)
  field = ode.augmented_vector_field(lambda x, g: parts.drift(params, x, g), probe,
                                     parts.settings.exact_trace_chunk)
  y0 = (z0, jnp.zeros(k.shape[0], dtype))
  (x1, delta), nfe, ok = ode.solve_diffrax(field, y0, deq.gamma0, parts.schedule.gamma_max,
                                           parts.solver, num_real)
  return parts.finish(x1, delta, deq.log_weight.astype(dtype)), nfe, ok


def _on_device(parts: _Parts, mesh: jax.sharding.Mesh | None) -> LogProbFn:
  """A diffrax solve under jax.jit, split over ``mesh`` when it has several devices."""
  s = parts.settings
  sharded = mesh is not None and mesh.size > 1
  rows = parallel.batch_sharding(mesh) if mesh is not None and sharded else None

  def solve_one(params, k, key, num_real):
    return solve_sample(parts, params, k, key, num_real, rows)

  solve = jax.jit(precision_lib.traced_with(s.precision, solve_one), static_argnums=3,
                  out_shardings=(parallel.replicated_sharding(mesh)
                                 if mesh is not None and sharded else None))

  def sample(params: PyTree, k: jax.Array, key: jax.Array,
             num_real: int | None) -> tuple[np.ndarray, int, bool]:
    bound, nfe, ok = solve(params, k, key, num_real)
    return np.asarray(parallel.local_copy(bound)), int(nfe), bool(ok)

  return LogProbFn(sample, s, mesh if sharded else None, solve)


@dataclasses.dataclass(frozen=True)
class Backend:
  """How the likelihood ODE of a solver is solved: ``build(parts, mesh)`` makes the
  LogProbFn; ``shards`` whether it can split a batch over several devices."""
  build: Callable[[_Parts, "jax.sharding.Mesh | None"], LogProbFn]
  shards: bool


# eval.solver -> backend; a new diffrax solver in ode.py is a new row here.
BACKENDS: dict[str, Backend] = {
    **{name: Backend(_on_device, shards=True) for name in ode.DIFFRAX_SOLVERS},
    "scipy_rk45": Backend(_on_host, shards=False),
}
assert set(BACKENDS) == set(ode.SOLVERS), "every solver of ode.py needs a backend"


def is_sharded(mesh: jax.sharding.Mesh | None, settings: EvalSettings) -> bool:
  """Whether a solve with these settings is split over mesh."""
  return (mesh is not None and mesh.size > 1
          and BACKENDS[settings.solver.solver].shards)


def draw_noise(settings: EvalSettings, schedule: Schedule, num_levels: int, k: jax.Array,
               key: jax.Array) -> tuple[Any, jax.Array | None]:
  """(dequantized start, divergence probe) of one importance sample of the batch k.

  What the solve of ``make_log_prob_fn`` starts from with the sample key ``key`` (the
  call's key folded with the sample's index): the dequantization (``dequantization.py``:
  z0, gamma0 and the log-weight) and the Hutchinson probe (None for the exact trace).
  """
  k_deq, k_probe = jax.random.split(key)
  deq = dequantize(settings.dequantization, k_deq, k, schedule, num_levels, settings.gamma_u,
                   settings.analytic_entropy)
  return deq, ode.draw_probe(settings.divergence, k_probe, k.shape)




def _perturbed(prepare: Callable[[jax.Array, jax.Array], tuple[Any, jax.Array | None]],
               size: float, k: jax.Array, key: jax.Array) -> tuple[Any, jax.Array | None]:
  """prepare's noise with z0 moved by size * (random signs)."""
  deq, probe = prepare(k, key)
  signs = jax.random.rademacher(jax.random.fold_in(key, PERTURBATION_KEY_INDEX), deq.z0.shape,
                                deq.z0.dtype)
  return deq.replace(z0=deq.z0 + size * signs), probe


def make_log_prob_fn(drift: ParamsDrift, schedule: Schedule, num_levels: int,
                     settings: EvalSettings,
                     mesh: jax.sharding.Mesh | None = None,
                     start_perturbation: float = 0.0) -> LogProbFn:
  """The bound of an integer batch k: ``fn(params, k, key, num_real=None) -> Bound``.

  ``drift(params, x, gamma)`` is the probability-flow drift of a batch at scalar gamma.
  Each of the K samples draws its own dequantization noise and divergence probe.
  ``start_perturbation`` > 0 moves every component of the start z0 by that amount, with
  a random sign (key ``fold_in(sample key, PERTURBATION_KEY_INDEX)``), after the noise is
  drawn: the same bound from a start one rounding step away, for the reproducibility
  check of ``evaluation.evaluate_batches``.

  With a ``mesh`` of several devices (see the module docstring) k must be a global batch
  over it (``placement.place_batch``) whose first ``num_real`` rows are images and the
  rest padding, and params replicated over it; the bounds of the ``num_real`` rows come
  back on every process. Without one (or with one device) k is any array on one device.

  Caveat for K > 1 with a Hutchinson divergence: the importance-weighted bound needs
  unbiased estimates of p, but Hutchinson gives unbiased estimates of log p, so
  exp(noisy log p) is biased upward and the K-sample average may overstate the
  likelihood by an amount that grows with the probe variance. Use divergence='exact'
  (small images) to check; a warning is printed and logged (``errors.warn``).
  """
  parts = make_parts(drift, schedule, num_levels, settings, start_perturbation)
  return BACKENDS[settings.solver.solver].build(parts, mesh)


def make_parts(drift: ParamsDrift, schedule: Schedule, num_levels: int, settings: EvalSettings,
               start_perturbation: float = 0.0) -> _Parts:
  """The noise drawing, the end of the bound and the solver settings of ``make_log_prob_fn``
  (also what ``differentiable.py`` solves with). Warns of K > 1 with a Hutchinson divergence
  once per bound: not for the perturbed twin of the reproducibility check."""
  s = settings
  if s.num_importance > 1 and s.divergence != "exact" and not start_perturbation:
    warn(f"num_importance={s.num_importance} with a {s.divergence} (Hutchinson) divergence: "
         "the importance-weighted bound can be biased upward by the estimator's noise; "
         "check with divergence='exact' on small images")

  prepare = functools.partial(draw_noise, settings, schedule, num_levels)
  if start_perturbation:
    prepare = functools.partial(_perturbed, prepare, float(start_perturbation))

  def finish(x1, delta, log_weight):
    return prior_log_density(x1, schedule) + delta + log_weight

  return _Parts(prepare, finish, drift, schedule, effective_solver(s, schedule), s)


def make_sde_fn(loss_fn: Callable[..., Any], settings: EvalSettings,
                mesh: jax.sharding.Mesh | None = None
                ) -> Callable[[PyTree, jax.Array, jax.Array, int | None], np.ndarray]:
  """sde(params, k, key, num_real=None) -> the VDM ELBO (nats) per image of k[:num_real].

  The ELBO terms use the training loss (no dropout) with its own noise and time draws;
  with a mesh k is a padded global batch as for ``make_log_prob_fn``, and the padding
  rows are dropped inside the jitted function (the time draws stratify over the real
  rows only, as on one device).
  """
  sharded = is_sharded(mesh, settings)

  def sde(params, k, key, num_real):
    if num_real is not None:
      k = k[:num_real]
    return loss_fn(params, k, key, False)[1].sde_nats()

  jitted = jax.jit(precision_lib.traced_with(settings.precision, sde), static_argnums=3,
                   out_shardings=(parallel.replicated_sharding(mesh)
                                  if mesh is not None and sharded else None))

  def sde_fn(params: PyTree, k: jax.Array, key: jax.Array,
             num_real: int | None = None) -> np.ndarray:
    if num_real is not None and num_real >= k.shape[0]:
      num_real = None
    return np.asarray(parallel.local_copy(jitted(params, k, key, num_real)))

  return sde_fn


def logmeanexp(a: np.ndarray) -> np.ndarray:
  """log (1/K) sum_k exp(a_k) over the leading axis, in float64."""
  top = a.max(axis=0)
  return top + np.log(np.mean(np.exp(a - top), axis=0))


def bits_per_dim(log_prob: np.ndarray | jax.Array, dim: int) -> np.ndarray:
  """-log P / (D ln 2) elementwise."""
  return nats_to_bpd(-np.asarray(log_prob), dim)
