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

Solvers: diffrax's adaptive ``dopri5`` (``DEFAULT_SOLVER``), ``tsit5``, ``bosh3``
and ``dopri8`` (``DIFFRAX_SOLVERS``) with a PID controller, an error norm (``error_norm``)
and a time variable (``TIME_VARIABLES``), jit-compiled, the solve never leaving the device;
and ``scipy_rk45``, the official code's host loop, for checking numbers against it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeAlias

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from diffode_jax.discretization import sum_per_example
from diffode_jax.errors import ConfigError
from diffode_jax.schedules import FloatLike, default_gamma_min

DIVERGENCES = ("rademacher", "gaussian", "exact")
# Adaptive diffrax solvers: name -> (class, evaluations per step). The count per step is the
# number of stages that are not reused from the step before (FSAL: first same as last);
# dt0=None adds one evaluation at the start (the initial step size needs f at t0).
DIFFRAX_SOLVERS: dict[str, tuple[type[diffrax.AbstractAdaptiveSolver], int]] = {
    "dopri5": (diffrax.Dopri5, 6),
    "tsit5": (diffrax.Tsit5, 6),
    "bosh3": (diffrax.Bosh3, 3),
    "dopri8": (diffrax.Dopri8, 13),
}
SOLVERS = tuple(DIFFRAX_SOLVERS) + ("scipy_rk45",)
# Error norms of the step-size control (``error_norm``): what "one step is accurate enough"
# means for a batch of states.
NORMS = ("rms", "image_max", "leaf_max", "image_leaf_max")
# Time variables of the integration (``TIME_VARIABLES``): the ODE is solved in s(gamma).
TIMES = ("gamma", "sigma", "angle", "rho7")

# Defaults of a SolverConfig (the evaluation and sampling defaults built from them are
# likelihood.DEFAULT_EVAL_SOLVER and sampling.DEFAULT_SAMPLE_SOLVER, which
# configs/default.py reads; bench/solver_study.py measures the choice).
DEFAULT_DIVERGENCE = "rademacher"
DEFAULT_SOLVER = "dopri5"
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_STEPS = 4096
DEFAULT_NORM = "rms"
DEFAULT_TIME = "gamma"

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
  norm: str = DEFAULT_NORM
  time: str = DEFAULT_TIME

  def __post_init__(self) -> None:
    if self.solver not in SOLVERS:
      raise ValueError(f"unknown solver {self.solver!r}; expected one of {SOLVERS}")
    if self.norm not in NORMS:
      raise ValueError(f"unknown error norm {self.norm!r}; expected one of {NORMS}")
    if self.time not in TIMES:
      raise ValueError(f"unknown time variable {self.time!r}; expected one of {TIMES}")
    if self.solver == "scipy_rk45" and (self.norm, self.time) != ("rms", "gamma"):
      raise ValueError("solver scipy_rk45 (the official host loop) integrates in gamma with "
                       "scipy's RMS norm: norm='rms' and time='gamma' only")
    for name in ("rtol", "atol"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"solver {name} must be a positive number, got {value!r}")
    if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) \
        or self.max_steps < 1:
      raise ValueError(f"solver max_steps must be an integer >= 1, got {self.max_steps!r}")

  # The fields a config section (config.eval, config.sample) holds; the PID coefficients
  # are API-only.
  SECTION_FIELDS: ClassVar[tuple[str, ...]] = ("solver", "rtol", "atol", "max_steps", "norm",
                                               "time")

  @classmethod
  def from_section(cls, section: Any, **overrides: Any) -> SolverConfig:
    """The solver of config.eval or config.sample, with ``overrides`` (any field) on top
    (ValueError for a bad value)."""
    return cls(**{**{name: section[name] for name in cls.SECTION_FIELDS}, **overrides})

  def section_fields(self) -> dict[str, Any]:
    """The inverse of ``from_section``: the values a config section holds."""
    return {name: getattr(self, name) for name in self.SECTION_FIELDS}


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


def check_on_device(cfg: SolverConfig, who: str) -> None:
  """ConfigError unless cfg's solver runs on device (a diffrax solver): ``who`` is the
  setting or function that needs a solve it can trace."""
  if cfg.solver not in DIFFRAX_SOLVERS:
    raise ConfigError(f"{who} solves on device: its solver must be one of "
                      f"{tuple(DIFFRAX_SOLVERS)}, got {cfg.solver!r} (a host loop cannot be "
                      "traced)")


def _diffrax_solver(name: str) -> diffrax.AbstractAdaptiveSolver:
  return DIFFRAX_SOLVERS[name][0]()


def error_norm(kind: str, num_rows: int | None = None) -> Norm:
  """The error norm ``kind`` of the step-size control over a batch state.

  diffrax divides each component's local error estimate by atol + rtol |y| and accepts
  the step when the norm of that pytree is at most 1. Every leaf of the state has the
  batch on its leading axis (x: (B, ...), the log-density change l: (B,)). With e the
  scaled errors, over the first ``num_rows`` rows only (None: all; the rest are padding
  of a batch split over devices and take no part in the control):

  * ``rms``: sqrt(mean of e^2) over every component of the batch (diffrax's and scipy's
    default; the D + 1 components of an image weigh alike, so l counts 1 / (D + 1));
  * ``image_max``: the largest per-image RMS over that image's components (no image's
    error is averaged away by the easy ones);
  * ``leaf_max``: the largest per-leaf RMS over the batch, i.e. max(RMS of x, RMS of l):
    the log-density change weighs as much as the whole of x;
  * ``image_leaf_max``: the largest of the per-image, per-leaf RMS values.
  """
  if kind not in NORMS:
    raise ValueError(f"unknown error norm {kind!r}; expected one of {NORMS}")

  def per_row(leaf: jax.Array) -> tuple[jax.Array, int]:
    """(sum of squares per row, components per row) of the real rows."""
    rows = leaf.shape[0] if num_rows is None else num_rows
    flat = leaf[:rows].reshape(rows, -1)
    sq = jnp.einsum("bi,bi->b", flat, flat, precision=jax.lax.Precision.HIGHEST)
    return sq, flat.shape[1]

  def norm(tree: PyTree) -> jax.Array:
    # the step sizes carry no gradient (and sqrt has none at 0)
    parts = [per_row(jax.lax.stop_gradient(leaf)) for leaf in jax.tree.leaves(tree)]
    if kind == "rms":
      total = sum(sq.sum() for sq, _ in parts)
      return jnp.sqrt(total / sum(sq.shape[0] * n for sq, n in parts))
    if kind == "image_max":
      total = sum(sq for sq, _ in parts)
      return jnp.sqrt(jnp.max(total) / sum(n for _, n in parts))
    if kind == "leaf_max":
      return jnp.sqrt(jnp.max(jnp.stack([sq.sum() / (sq.shape[0] * n) for sq, n in parts])))
    return jnp.sqrt(jnp.max(jnp.stack([jnp.max(sq) / n for sq, n in parts])))

  return norm


@dataclasses.dataclass(frozen=True)
class TimeVariable:
  """A variable s(gamma), increasing in gamma, in which the ODE is integrated.

  dx/ds = dx/dgamma * dgamma/ds, so the solution at each gamma is the same whatever s is;
  what changes is where an adaptive solver places its steps (the local error of a step
  depends on how the field varies in s).
  """
  of_gamma: Callable[[jax.Array], jax.Array]
  to_gamma: Callable[[jax.Array], jax.Array]
  dgamma_ds: Callable[[jax.Array], jax.Array]


# s for each name: gamma (the log signal-to-noise ratio, the project's time); sigma =
# exp(gamma / 2), the noise-to-signal ratio sigma/alpha (EDM's sigma of the variance-exploding
# form); angle = arctan(sigma / alpha), the angle of (alpha, sigma) on the unit circle (the
# cosine schedule's time up to a factor pi / 2); rho7 = sigma^(1/7), EDM's step spacing rho = 7.
TIME_VARIABLES: dict[str, TimeVariable] = {
    "gamma": TimeVariable(lambda g: g, lambda s: s, jnp.ones_like),
    "sigma": TimeVariable(lambda g: jnp.exp(0.5 * g), lambda s: 2.0 * jnp.log(s),
                          lambda s: 2.0 / s),
    "angle": TimeVariable(lambda g: jnp.arctan(jnp.exp(0.5 * g)),
                          lambda s: 2.0 * jnp.log(jnp.tan(s)),
                          lambda s: 4.0 / jnp.sin(2.0 * s)),
    "rho7": TimeVariable(lambda g: jnp.exp(g / 14.0), lambda s: 14.0 * jnp.log(s),
                         lambda s: 14.0 / s),
}
assert set(TIME_VARIABLES) == set(TIMES)


def in_time_variable(field: VectorField, name: str) -> tuple[VectorField, TimeVariable]:
  """field(gamma, y, args) as a field in the time variable ``name``, and that variable."""
  var = TIME_VARIABLES[name]
  if name == "gamma":
    return field, var

  def field_s(s: jax.Array, y: PyTree, args: Any) -> PyTree:
    scale = var.dgamma_ds(s)
    return jax.tree.map(lambda d: d * scale.astype(d.dtype), field(var.to_gamma(s), y, args))

  return field_s, var


def solve_diffrax(field: VectorField, y0: PyTree, t0: FloatLike, t1: FloatLike, cfg: SolverConfig,
                  num_rows: int | None = None) -> tuple[PyTree, jax.Array, jax.Array]:
  """Integrates field (a field in gamma) from gamma t0 to t1 on device; returns (y1, nfe,
  success) as arrays.

  The solver, the step-size controller (PID coefficients), the error norm (``error_norm``
  over the first ``num_rows`` rows of every leaf; None: all) and the time variable
  (``TIME_VARIABLES``) come from ``cfg``. nfe counts vector-field evaluations: the
  solver's evaluations per attempted step (``DIFFRAX_SOLVERS``) plus 1 for the start
  (checked against a counting callback in the tests).
  """
  field_s, var = in_time_variable(field, cfg.time)
  dtype = jax.tree.leaves(y0)[0].dtype
  s0 = var.of_gamma(jnp.asarray(t0, dtype))
  s1 = var.of_gamma(jnp.asarray(t1, dtype))
  # the whole-batch RMS norm is diffrax's own default (lineax's rms_norm)
  extra: dict[str, Any] = ({} if cfg.norm == "rms" and num_rows is None
                           else {"norm": error_norm(cfg.norm, num_rows)})
  controller = diffrax.PIDController(rtol=cfg.rtol, atol=cfg.atol, pcoeff=cfg.pcoeff,
                                     icoeff=cfg.icoeff, dcoeff=cfg.dcoeff, **extra)
  sol = diffrax.diffeqsolve(
      # diffrax calls the field with t as a (traced) jax.Array, never a Python number
      diffrax.ODETerm(field_s),  # type: ignore[arg-type]
      _diffrax_solver(cfg.solver), t0=s0, t1=s1, dt0=None, y0=y0,
      stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
      max_steps=cfg.max_steps, throw=False)
  y1 = jax.tree.map(lambda a: a[-1], sol.ys)
  nfe = DIFFRAX_SOLVERS[cfg.solver][1] * sol.stats["num_steps"] + 1
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

