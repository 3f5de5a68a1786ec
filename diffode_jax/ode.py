"""The probability-flow ODE augmented with the log-density change (docs/design.md, The augmented
ODE).

State (x, l) with x of shape (B, H, W, C) and l of shape (B,), integrated in gamma from
gamma_0 (data end) to gamma_max:

    d/dgamma [x, l] = [drift(x, gamma), div_x drift(x, gamma)],   l(gamma_0) = 0,
    log p_gamma0(x_0) = log p_gamma_max(x_1) + l(gamma_max).

The batch is solved as one system (one step-size sequence for all its images), as in the
reference implementations. The drift must act on each image independently (no batch
statistics), so that its Jacobian is block-diagonal and per-image traces are well defined.

Divergence estimators:

* ``rademacher`` / ``gaussian``: Hutchinson, v^T J v with one probe v per image drawn
  once per solve. J v comes from a forward-mode Jacobian-vector product, which returns
  the drift too, so one call gives both. (A vector-Jacobian product gives the same
  estimator, but XLA:CPU runs convolution VJPs several times slower inside loops,
  jax-ml/jax#12868; see bench/eval_speed.py.)
* ``exact``: the full trace from D Jacobian-vector products with the basis vectors, for
  small images and tests. By default all D tangents go through one ``vmap`` (D copies of
  the activations at once); ``exact_chunk`` = c evaluates them c at a time
  (``jax.lax.map`` with ``batch_size``), memory proportional to c, the same numbers to
  float32 roundoff: XLA:CPU compiles the tangent products differently above and below
  size thresholds, so they are bit for bit equal only for some c (tests/test_ode.py).

Solvers: diffrax's adaptive ``tsit5`` / ``dopri5`` (the default, ``DEFAULT_SOLVER``) with a
PID controller, jit-compiled, the solve never leaving the device; and ``scipy_rk45``, the
official code's host loop, for checking numbers against it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from diffode_jax.discretization import sum_per_example
from diffode_jax.schedules import FloatLike, default_gamma_min

DIVERGENCES = ("rademacher", "gaussian", "exact")
SOLVERS = ("tsit5", "dopri5", "scipy_rk45")

# Library defaults of the likelihood and sampling ODEs; configs/default.py uses these.
# dopri5 needs fewer evaluations than tsit5 at the same tolerance (bench/eval_speed.py).
DEFAULT_DIVERGENCE = "rademacher"
DEFAULT_SOLVER = "dopri5"
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_STEPS = 4096

PyTree: TypeAlias = Any
# drift_fn(x, gamma) -> dx/dgamma for a batch x and a scalar gamma.
DriftFn: TypeAlias = Callable[[jax.Array, jax.Array], jax.Array]
# drift(params, x, gamma) -> dx/dgamma: a model's drift (``model.Components.drift``).
ParamsDriftFn: TypeAlias = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
# The state (x, l) of the augmented ODE: a batch and its log-density change (B,).
AugmentedState: TypeAlias = tuple[jax.Array, jax.Array]
# A diffrax-style vector field f(t, y, args) -> dy/dt, y any pytree.
VectorField: TypeAlias = Callable[[jax.Array, PyTree, Any], PyTree]
# The field of the augmented ODE: f(gamma, (x, l), args) -> (dx, dl).
AugmentedField: TypeAlias = Callable[[jax.Array, AugmentedState, Any], AugmentedState]
# An error norm of the step-size control: pytree -> scalar.
Norm: TypeAlias = Callable[[PyTree], jax.Array]


def draw_probe(kind: str, key: jax.Array, shape: Sequence[int],
               dtype: DTypeLike = jnp.float32) -> jax.Array | None:
  """A Hutchinson probe (E[v v^T] = I), or None for the exact trace."""
  if kind == "rademacher":
    return jax.random.rademacher(key, shape, dtype=dtype)
  if kind == "gaussian":
    return jax.random.normal(key, shape, dtype)
  if kind == "exact":
    return None
  raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def hutchinson_jvp(fn: Callable[[jax.Array], jax.Array], x: jax.Array, probe: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(fn(x), v^T J v per example) with J = dfn/dx at x and v = probe, shaped like x.

  J v is one forward-mode Jacobian-vector product, which evaluates fn(x) as well; with
  E[v v^T] = I, v^T J v is an unbiased estimate of the per-example trace of J (when fn
  acts on each example of the batch independently).
  """
  out, jv = jax.jvp(fn, (x,), (probe,))
  return out, sum_per_example(probe * jv)


def drift_and_divergence(drift_fn: DriftFn, x: jax.Array, gamma: jax.Array,
                         probe: jax.Array | None, exact_chunk: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """(drift, divergence per image); exact trace when probe is None.

  The exact trace takes the D diagonal entries of J from D Jacobian-vector products with
  the basis vectors: all in one ``vmap`` (``exact_chunk`` None or >= D), or ``exact_chunk``
  at a time through ``jax.lax.map``, which bounds the memory to that many copies of the
  network's activations.
  """
  if probe is not None:
    return hutchinson_jvp(lambda y: drift_fn(y, gamma), x, probe)
  dim = math.prod(x.shape[1:])
  dx = drift_fn(x, gamma)

  def diag_entry(i: jax.Array) -> jax.Array:
    basis = jax.nn.one_hot(i, dim, dtype=x.dtype).reshape((1,) + x.shape[1:])
    tangent = jnp.broadcast_to(basis, x.shape)
    _, jv = jax.jvp(lambda y: drift_fn(y, gamma), (x,), (tangent,))
    return jv.reshape(x.shape[0], -1)[:, i]

  if exact_chunk is None or exact_chunk >= dim:
    return dx, jax.vmap(diag_entry, out_axes=1)(jnp.arange(dim)).sum(axis=1)
  diagonal = jax.lax.map(diag_entry, jnp.arange(dim), batch_size=int(exact_chunk))  # (D, B)
  return dx, diagonal.T.sum(axis=1)


def augmented_vector_field(drift_fn: DriftFn, probe: jax.Array | None,
                           exact_chunk: int | None = None) -> AugmentedField:
  """The diffrax-style field f(gamma, (x, l), args) of the augmented ODE."""

  def field(gamma: jax.Array, state: AugmentedState, args: Any) -> AugmentedState:
    del args
    x, _ = state
    return drift_and_divergence(drift_fn, x, gamma, probe, exact_chunk)

  return field


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  solver: str = DEFAULT_SOLVER
  rtol: float = DEFAULT_RTOL
  atol: float = DEFAULT_ATOL
  max_steps: int = DEFAULT_MAX_STEPS
  pcoeff: float = 0.0
  icoeff: float = 1.0
  dcoeff: float = 0.0

  def __post_init__(self) -> None:
    if self.solver not in SOLVERS:
      raise ValueError(f"unknown solver {self.solver!r}; expected one of {SOLVERS}")
    for name in ("rtol", "atol"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"solver {name} must be a positive number, got {value!r}")
    if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) \
        or self.max_steps < 1:
      raise ValueError(f"solver max_steps must be an integer >= 1, got {self.max_steps!r}")


# The start time of the 8-bit default (tn at gamma_min = -2 log(3 * 256)): the solver
# tolerances are meant for states whose noise scale at the start is at least this coarse.
REFERENCE_GAMMA0 = default_gamma_min(256)


def tolerance_scale(gamma0: float) -> float:
  """Factor on rtol and atol for an ODE that starts (or, sampling, ends) at gamma0.

  1 for the defaults of every bit depth up to 8.

  The density of the start state varies on the scale of its noise, sigma_0 / alpha_0 =
  exp(gamma_0 / 2) in data units, while the error control sees the whole state, of size
  about 1. A fixed rtol therefore allows an error of rtol / exp(gamma_0 / 2) noise
  widths: 0.008 at 8 bits (rtol 1e-5) but 2 at 16 bits, where the oracle's `tn` bound
  came out 9 nats per image too high. The tolerances are tightened in proportion to the
  noise scale below the 8-bit default, which keeps the error in noise widths the same.
  """
  return min(1.0, math.exp((gamma0 - REFERENCE_GAMMA0) / 2.0))


def scaled_tolerances(cfg: SolverConfig, gamma0: float) -> SolverConfig:
  """cfg with rtol and atol multiplied by ``tolerance_scale(gamma0)``."""
  scale = tolerance_scale(gamma0)
  return dataclasses.replace(cfg, rtol=cfg.rtol * scale, atol=cfg.atol * scale)


def _diffrax_solver(name: str) -> diffrax.AbstractSolver:
  return {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}[name]()


def rows_rms_norm(num_rows: int) -> Norm:
  """The RMS norm of diffrax's error control over the first ``num_rows`` rows only.

  For a batch padded to a multiple of the device count: the padding rows (after the
  first num_rows) take no part in the step-size control, so the real rows are solved as
  they would be without them. Same formula as lineax's ``rms_norm`` (the default norm)
  restricted to those rows.
  """

  def norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    size = sum(num_rows * math.prod(leaf.shape[1:]) for leaf in leaves)
    total: jax.Array | float = 0.0
    for leaf in leaves:
      keep = (jnp.arange(leaf.shape[0]) < num_rows).reshape((-1,) + (1,) * (leaf.ndim - 1))
      kept = jnp.where(keep, leaf, 0.0).reshape(-1)
      total = total + jnp.dot(kept, kept, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(total) / math.sqrt(size)

  return norm


def solve_diffrax(field: VectorField, y0: PyTree, t0: FloatLike, t1: FloatLike, cfg: SolverConfig,
                  norm: Norm | None = None) -> tuple[PyTree, jax.Array, jax.Array]:
  """Integrates field from t0 to t1 on device; returns (y1, nfe, success) as arrays.

  nfe counts vector-field evaluations: 6 per attempted step of the 7-stage FSAL solvers
  plus 1 for the start (checked against a counting callback in the tests). ``norm`` is
  the error norm of the step-size control (None: diffrax's default RMS norm over the
  whole state; see ``rows_rms_norm``).
  """
  extra: dict[str, Any] = {} if norm is None else {"norm": norm}
  controller = diffrax.PIDController(rtol=cfg.rtol, atol=cfg.atol, pcoeff=cfg.pcoeff,
                                     icoeff=cfg.icoeff, dcoeff=cfg.dcoeff, **extra)
  sol = diffrax.diffeqsolve(
      # diffrax calls the field with t as a (traced) jax.Array, never a Python number
      diffrax.ODETerm(field),  # type: ignore[arg-type]
      _diffrax_solver(cfg.solver), t0=t0, t1=t1, dt0=None, y0=y0,
      stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
      max_steps=cfg.max_steps, throw=False)
  y1 = jax.tree.map(lambda a: a[-1], sol.ys)
  nfe = 6 * sol.stats["num_steps"] + 1
  return y1, nfe, sol.result == diffrax.RESULTS.successful


def solve_scipy(field: AugmentedField, y0: AugmentedState, t0: FloatLike, t1: FloatLike,
                cfg: SolverConfig, args: Any = None
                ) -> tuple[tuple[np.ndarray, np.ndarray], int, bool]:
  """The official code's path: scipy's RK45 on the host, one jitted call per evaluation.

  ``field(t, (x, l), args)`` is jitted as it is, so a field defined once and called with
  changing ``args`` (params, probe) compiles once for all solves. Returns (y1, nfe,
  success) as numpy values.
  """
  from scipy.integrate import solve_ivp  # host-only dependency of this path

  x0, l0 = y0
  shape, n = x0.shape, x0.size
  jitted = jax.jit(field)

  def rhs(t: float, flat: np.ndarray) -> np.ndarray:
    x = jnp.asarray(flat[:n].reshape(shape), x0.dtype)
    dx, dl = jitted(jnp.asarray(t, x0.dtype), (x, l0), args)
    return np.concatenate([np.asarray(dx, np.float64).ravel(), np.asarray(dl, np.float64)])

  flat0 = np.concatenate([np.asarray(x0, np.float64).ravel(), np.asarray(l0, np.float64)])
  sol = solve_ivp(rhs, (float(t0), float(t1)), flat0, method="RK45", rtol=cfg.rtol,
                  atol=cfg.atol)
  end = sol.y[:, -1]
  y1 = (end[:n].reshape(shape).astype(np.float32), end[n:].astype(np.float32))
  return y1, sol.nfev, bool(sol.success)

