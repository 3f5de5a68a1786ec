"""A user's own diffusion or flow model as a probability-flow ODE of the project
(docs/own_model.md): the path, the conversion of what ``fn`` predicts into the drift, and the
checks of both.

The user's forward path is u_t = alpha(t) y + sigma(t) eps with y the data in the model's
units. ``data_range`` = (lo, hi) maps the library's data x in [-1, 1] (level centres
(2k + 1) / V - 1) to y = s x + c with s = (hi - lo) / 2 and c = (hi + lo) / 2. The state the
project integrates is z = (u - alpha c) / s = alpha x + (sigma / s) eps: the same path in
the library's units with alpha_p = alpha, sigma_p = sigma / s, so its time is

    gamma = log(sigma_p^2 / alpha_p^2) = log(sigma^2 / alpha^2) - 2 log s.

The map z -> u is affine with Jacobian s^D at every t and a shift that does not depend on
the state, so the divergence is the same in both units and log p_z = log p_u + D log s:
working in z puts the data_range's log-Jacobian into the bound (and the prior
N(0, sigma_p(gamma_max)^2 I) in z is N(alpha c, sigma^2 I) in u).

In gamma time the probability-flow ODE of any such path is (docs/design.md, Schedules)

    dz/dgamma = (d log alpha / d gamma) z + (sigma_p / 2) eps_hat,

with eps_hat from fn's output F at (u, t): ``eps`` F; ``x0`` (u - alpha F) / sigma; ``score``
-sigma F; and ``dx_dt`` (F = du/dt) gives the drift directly,
dz/dgamma = (F - alpha'(t) c) / (s gamma'(t)).

t(gamma) is found by bisection on [t_min, t_end] (64 halvings of the stopped gamma) and one
Newton step, which gives t to roundoff and dt/dgamma = 1 / gamma'(t) to differentiation;
a closed-form inverse (``t_of_gamma``, the presets have one) replaces it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffode_jax.discretization import bin_centre
from diffode_jax.errors import ConfigError, LikelihoodError, described
from diffode_jax.schedules import (Coefficients, FloatLike, Schedule, default_gamma_min,
                                   expand_like)

PyTree = Any
UserFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
TimeFn = Callable[[jax.Array], jax.Array]

# predicts -> the noise estimate eps_hat(u, out, alpha, sigma) from fn's output ``out`` at
# u = alpha y + sigma eps (all in the model's units); "dx_dt" is a drift of its own.
EPS_FROM_OUTPUT: dict[str, Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "eps": lambda u, out, alpha, sigma: out,
    "x0": lambda u, out, alpha, sigma: (u - alpha * out) / sigma,  # a denoiser
    "score": lambda u, out, alpha, sigma: -sigma * out,  # grad log p_t = -eps / sigma
}
PREDICTS = (*EPS_FROM_OUTPUT, "dx_dt")
# The noise end must reach at least the project's own gamma_max (configs: 5): the prior
# N(0, sigma_max^2) then costs at most exp(-gamma_max) / 2 nats per dimension of |x| <= 1.
NOISE_GAMMA = 5.0
# A path whose alpha reaches 0 (the straight path at t = 1, VP cosine at t = 1) has
# gamma = inf there; the solve ends at this gamma instead (prior error below 4e-6 nats/dim).
GAMMA_MAX_CAP = 12.0
# Points of the grid on which the path is checked.
CHECK_POINTS = 4097
BISECTION_STEPS = 64
# Values of t at which fn is checked for NaN / inf after a failed solve.
DIAGNOSIS_POINTS = 33


@dataclasses.dataclass(frozen=True)
class UserPath:
  """alpha(t), sigma(t) of the user's path on [t_min, t_end], in the library's units through
  ``scale`` s and ``shift`` c of data_range (module docstring).

  ``t_of_user_gamma``: a closed-form inverse of log(sigma^2 / alpha^2) (None: bisection).
  """

  alpha: TimeFn
  sigma: TimeFn
  t_min: float
  t_end: float
  scale: float
  shift: float
  t_of_user_gamma: TimeFn | None = None

  def gamma_of_t(self, t: jax.Array) -> jax.Array:
    """gamma in the library's units: log(sigma^2 / alpha^2) - 2 log s."""
    return 2.0 * (jnp.log(self.sigma(t)) - jnp.log(self.alpha(t))) - 2.0 * math.log(self.scale)

  def derivatives(self, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(alpha, sigma, d alpha / dt, d sigma / dt) elementwise."""
    ones = jnp.ones_like(t)
    alpha, dalpha = jax.jvp(self.alpha, (t,), (ones,))
    sigma, dsigma = jax.jvp(self.sigma, (t,), (ones,))
    return alpha, sigma, dalpha, dsigma

  @property
  def gamma_max(self) -> float:
    """The gamma of the noise end t_end, at most GAMMA_MAX_CAP (float32 roundoff of the
    capped t_end can put it a hair above)."""
    with jax.ensure_compile_time_eval():
      return min(float(self.gamma_of_t(jnp.float32(self.t_end))), GAMMA_MAX_CAP)

  def t_of_gamma(self, gamma: FloatLike) -> jax.Array:
    """t with gamma_of_t(t) = gamma (any shape)."""
    gamma = jnp.asarray(gamma)
    if not jnp.issubdtype(gamma.dtype, jnp.floating):
      gamma = gamma.astype(jnp.result_type(float))
    if self.t_of_user_gamma is not None:
      return self.t_of_user_gamma(gamma + 2.0 * math.log(self.scale))
    g = jax.lax.stop_gradient(gamma)
    lo = jnp.full_like(g, self.t_min)
    hi = jnp.full_like(g, self.t_end)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      below = self.gamma_of_t(mid) < g
      return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, halve, (lo, hi))
    t0 = 0.5 * (lo + hi)
    g0, dg = jax.jvp(self.gamma_of_t, (t0,), (jnp.ones_like(t0),))
    step = jax.lax.stop_gradient((g0, dg))
    newton = (gamma - step[0]) / step[1]
    newton = jnp.where(jnp.isfinite(newton), newton, jnp.zeros_like(newton))
    t = t0 + newton
    # clipped in value only: the derivative stays 1 / gamma'(t) at the ends too
    return t + jax.lax.stop_gradient(jnp.clip(t, self.t_min, self.t_end) - t)

  def at(self, gamma: FloatLike) -> tuple[jax.Array, Coefficients, jax.Array, jax.Array]:
    """(t, Coefficients in the library's units, d alpha / dt, d gamma / dt) at gamma."""
    t = self.t_of_gamma(gamma)
    alpha, sigma, dalpha_dt, dsigma_dt = self.derivatives(t)
    dgamma_dt = 2.0 * (dsigma_dt / sigma - dalpha_dt / alpha)
    s = self.scale
    coeffs = Coefficients(alpha=alpha, sigma=sigma / s, dalpha=dalpha_dt / dgamma_dt,
                          dsigma=dsigma_dt / (s * dgamma_dt),
                          dlog_alpha=dalpha_dt / (alpha * dgamma_dt))
    return t, coeffs, dalpha_dt, dgamma_dt


@dataclasses.dataclass(frozen=True)
class PathSchedule(Schedule):
  """A Schedule whose alpha and sigma are a user's path (``UserPath``) in gamma time."""

  path: UserPath | None = None

  def __post_init__(self) -> None:
    if self.path is None:
      raise ValueError("a PathSchedule needs its path")
    self._check_range()  # not Schedule's name check: its name is not a built-in schedule

  def coefficients(self, gamma: FloatLike) -> Coefficients:
    assert self.path is not None  # checked at init
    return self.path.at(gamma)[1]


def make_drift(fn: UserFn, predicts: str, path: UserPath
               ) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
  """drift(params, z, gamma) -> dz/dgamma of the library's state z (module docstring)."""
  if predicts not in PREDICTS:
    raise ConfigError(f"unknown predicts {predicts!r}; expected one of {PREDICTS}")
  s, c = path.scale, path.shift

  def drift(params: PyTree, z: jax.Array, gamma: jax.Array) -> jax.Array:
    gamma = jnp.asarray(gamma, z.dtype)
    t, k, dalpha_dt, dgamma_dt = path.at(gamma)  # gamma: scalar or per image (B,)
    t_batch = jnp.broadcast_to(t, z.shape[:1]).astype(z.dtype)
    alpha, sigma = expand_like(k.alpha, z), expand_like(k.sigma * s, z)
    u = s * z + alpha * c
    out = fn(params, u, t_batch)
    check_output(out, u)
    if predicts == "dx_dt":
      return (out - expand_like(dalpha_dt, z) * c) / (s * expand_like(dgamma_dt, z))
    eps_hat = EPS_FROM_OUTPUT[predicts](u, out, alpha, sigma)
    return expand_like(k.dlog_alpha, z) * z + 0.5 * expand_like(k.sigma, z) * eps_hat

  return drift


def check_output(out: Any, x: jax.Array) -> None:
  """ConfigError unless fn's output has x's shape and dtype (checked while tracing)."""
  shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
  if shape != x.shape or dtype != x.dtype:
    got = (f"shape {tuple(shape)} and dtype {dtype}" if shape is not None
           else type(out).__name__)
    raise ConfigError(f"fn(params, x, t) must return an array of x's shape {x.shape} and "
                      f"dtype {x.dtype}, got {got}")


def probe_fn(fn: UserFn, params: PyTree, image_shape: tuple[int, int, int]) -> None:
  """Traces fn on two images of the default float type (float32; float64 under
  jax_enable_x64), without computing: its output must match x."""
  dtype = jnp.result_type(float)
  x = jax.ShapeDtypeStruct((2,) + tuple(image_shape), dtype)
  t = jax.ShapeDtypeStruct((2,), dtype)
  try:
    out = jax.eval_shape(fn, params, x, t)
  except ConfigError:
    raise
  except Exception as err:  # the user's fn: any error while tracing it
    raise ConfigError(f"fn(params, x, t) fails on x of shape {x.shape} {dtype} and t of "
                      f"shape (2,): {described(err)}") from None
  check_output(out, jnp.zeros(x.shape, x.dtype))


def _host(values: TimeFn, t: np.ndarray) -> np.ndarray:
  with jax.ensure_compile_time_eval():
    return np.asarray(values(jnp.asarray(t, jnp.float32)), np.float64)


def check_path(alpha: TimeFn, sigma: TimeFn, t_min: float, t_max: float, scale: float,
               shift: float, num_levels: int, t_of_user_gamma: TimeFn | None = None
               ) -> UserPath:
  """The UserPath of (alpha, sigma) on [t_min, t_max], checked: gamma increasing, the tn
  start reached at t_min, noise reached at t_max. One-line ConfigErrors otherwise."""
  for name, value in (("t_min", t_min), ("t_max", t_max)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
        or not math.isfinite(value):
      raise ConfigError(f"{name} must be a finite number, got {value!r}")
  if not t_min < t_max:
    raise ConfigError(f"t_min ({t_min:g}) must be below t_max ({t_max:g})")
  ts = np.linspace(t_min, t_max, CHECK_POINTS)
  try:
    a, s = _host(alpha, ts), _host(sigma, ts)
  except Exception as err:  # the user's callables
    raise ConfigError(f"alpha(t) and sigma(t) must be JAX functions of an array t: "
                      f"{described(err)}") from None
  if a.shape != ts.shape or s.shape != ts.shape:
    raise ConfigError(f"alpha(t) and sigma(t) must act elementwise on t: an array of shape "
                      f"{ts.shape} gave {a.shape} and {s.shape}")
  if -1e-6 < a[-1] < 0:  # float32 roundoff of an alpha that reaches 0, as cos(pi / 2)
    a[-1] = 0.0
  bad = ~(np.isfinite(a) & np.isfinite(s) & (a >= 0) & (s >= 0))
  bad[:-1] |= a[:-1] <= 0  # alpha may reach 0 at t_max only
  bad[1:] |= s[1:] <= 0  # sigma may be 0 at t_min only
  if bad.any():
    i = int(np.argmax(bad))
    raise ConfigError(f"the path needs alpha(t) > 0 and sigma(t) > 0 on (t_min, t_max); at "
                      f"t={ts[i]:.6g} alpha={a[i]:.6g}, sigma={s[i]:.6g}")
  with np.errstate(divide="ignore"):
    gamma = 2.0 * (np.log(s) - np.log(a)) - 2.0 * math.log(scale)
  falls = np.diff(gamma) <= 0
  if falls.any():
    i = int(np.argmax(falls))
    raise ConfigError(f"the signal-to-noise ratio alpha^2 / sigma^2 must fall monotonically "
                      f"on [t_min, t_max]; log(sigma^2 / alpha^2) does not increase from "
                      f"t={ts[i]:.6g} to t={ts[i + 1]:.6g}")
  gamma_min = default_gamma_min(num_levels)
  if gamma[0] > gamma_min:
    raise ConfigError(_too_noisy(alpha, sigma, t_min, scale, num_levels, gamma_min,
                                 float(gamma[0])))
  if gamma[-1] < NOISE_GAMMA - 1e-4:  # float32 roundoff of a path that ends at 5
    raise ConfigError(f"the path does not reach noise at t_max={t_max:g}: sigma/alpha there "
                      f"is {math.exp(gamma[-1] / 2) * scale:.4g} in the model's units, "
                      f"log(sigma^2 / alpha^2) - 2 log((hi - lo) / 2) = {gamma[-1]:.3g} < "
                      f"{NOISE_GAMMA:g}; raise t_max (or sigma) or check data_range")
  t_end = float(t_max)
  path = UserPath(alpha, sigma, float(t_min), t_end, float(scale), float(shift),
                  t_of_user_gamma)
  if gamma[-1] > GAMMA_MAX_CAP:
    with jax.ensure_compile_time_eval():
      t_end = float(path.t_of_gamma(jnp.float32(GAMMA_MAX_CAP)))
    path = dataclasses.replace(path, t_end=t_end)
  return path


def _too_noisy(alpha: TimeFn, sigma: TimeFn, t_min: float, scale: float, num_levels: int,
               gamma_min: float, gamma0: float) -> str:
  """The message of a t_min too noisy for the tn start, with a t_min that would do."""
  need = math.exp(gamma_min / 2) * scale
  head = (f"t_min={t_min:g} is too noisy for the tn start (docs/design.md, Schedules): "
          f"sigma/alpha there is {math.exp(gamma0 / 2) * scale:.4g} in the model's units, "
          f"at most {need:.4g} is needed (alpha/sigma = 3 V in [-1, 1] units)")
  if t_min > 0:  # look for the t in [0, t_min] where sigma/alpha = need
    lo, hi = 0.0, float(t_min)
    try:
      ratio = lambda t: float(_host(sigma, np.array([t]))[0] / _host(alpha, np.array([t]))[0])
      if not ratio(lo) <= need:  # also NaN
        raise ValueError
      for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ratio(mid) <= need else (lo, mid)
      return f"{head}; use t_min <= {lo:.4g}"
    except ValueError:  # sigma/alpha at t = 0 already too large (or not a number)
      pass
  return f"{head}; use a t_min where sigma/alpha <= {need:.4g}"


def find_nonfinite(fn: UserFn, params: PyTree, path: UserPath, k: np.ndarray,
                   num_levels: int, first_index: int) -> str | None:
  """Where fn returns NaN or inf on the forward path of the images k (one batch whose first
  image has index first_index): "image i at t=...", or None when fn is finite at every
  point checked (DIAGNOSIS_POINTS values of t from t_min to the end, one noise draw)."""
  y = path.scale * bin_centre(k, num_levels) + path.shift
  eps = jax.random.normal(jax.random.PRNGKey(0), y.shape, jnp.float32)

  @jax.jit
  def check(params: PyTree, t: jax.Array) -> jax.Array:
    x_t = expand_like(path.alpha(t), y) * y + expand_like(path.sigma(t), y) * eps
    return jnp.isfinite(fn(params, x_t, t)).reshape(y.shape[0], -1).all(axis=1)

  for t in np.linspace(path.t_min, path.t_end, DIAGNOSIS_POINTS):
    ok = np.asarray(check(params, jnp.full(y.shape[:1], t, jnp.float32)))
    if not ok.all():
      return f"image {first_index + int(np.argmin(ok))} at t={t:.6g}"
  return None


@dataclasses.dataclass(frozen=True)
class FnComponents:
  """What the Python API needs of a user's model: its schedule (the user's path in gamma
  time), drift, dimension and bit depth. There is no training loss (``loss_fn`` None), so
  no ELBO row."""

  schedule: PathSchedule
  fn: UserFn
  predicts: str
  dim: int
  num_levels: int
  loss_fn: None = None

  def drift(self, params: PyTree, x: jax.Array, gamma: jax.Array) -> jax.Array:
    """Probability-flow drift dx/dgamma in the library's units."""
    assert self.schedule.path is not None
    return make_drift(self.fn, self.predicts, self.schedule.path)(params, x, gamma)

  def nonfinite_error(self, params: PyTree, k: np.ndarray, first_index: int,
                      error: LikelihoodError) -> LikelihoodError:
    """A LikelihoodError naming the image and t where fn is not finite (else ``error``)."""
    assert self.schedule.path is not None
    where = find_nonfinite(self.fn, params, self.schedule.path, k, self.num_levels,
                           first_index)
    if where is None:
      return error
    return LikelihoodError(f"fn returned NaN or inf for {where} (on the forward path "
                           f"alpha(t) y + sigma(t) eps of that image)")


def _vp_linear(beta_min: float, beta_max: float) -> tuple[TimeFn, TimeFn]:
  def log_alpha(t: jax.Array) -> jax.Array:
    return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min

  return (lambda t: jnp.exp(log_alpha(t)),
          lambda t: jnp.sqrt(-jnp.expm1(2.0 * log_alpha(t))))


def path(name: str, **overrides: Any) -> dict[str, Any]:
  """A common forward path as the keyword arguments alpha, sigma, t_min, t_max, t_of_gamma
  of ``from_fn`` (t = 0 is the data end). ``overrides`` replace t_min, t_max (and
  beta_min / beta_max of vp_linear).

  * ``vp_cosine``: alpha = cos(pi t / 2), sigma = sin(pi t / 2) on [1e-4, 1];
  * ``vp_linear``: DDPM's linear beta (score_sde's VP SDE), beta_min 0.1, beta_max 20,
    log alpha = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2 on [1e-5, 1];
  * ``edm`` (variance exploding, k-diffusion's sigma): alpha = 1, sigma = t on [1e-3, 80];
  * ``straight`` (rectified flow, data at t = 0): alpha = 1 - t, sigma = t on [1e-4, 1];
  * ``idode_vp`` / ``idode_sp``: this project's VP and SP with t = gamma, on [-20, 5].

  The t_min are small enough for the tn start of 8-bit data in [-1, 1].
  """
  allowed = {"t_min", "t_max"} | ({"beta_min", "beta_max"} if name == "vp_linear" else set())
  unknown = set(overrides) - allowed
  if unknown:
    raise ConfigError(f"path {name!r} takes overrides {sorted(allowed)}, got {sorted(unknown)}")
  beta_min = overrides.pop("beta_min", 0.1)
  beta_max = overrides.pop("beta_max", 20.0)
  presets: dict[str, dict[str, Any]] = {
      "vp_cosine": dict(alpha=lambda t: jnp.cos(0.5 * jnp.pi * t),
                        sigma=lambda t: jnp.sin(0.5 * jnp.pi * t), t_min=1e-4, t_max=1.0,
                        t_of_gamma=lambda g: jnp.arctan(jnp.exp(0.5 * g)) * (2.0 / jnp.pi)),
      "vp_linear": dict(zip(("alpha", "sigma"), _vp_linear(beta_min, beta_max)),
                        t_min=1e-5, t_max=1.0, t_of_gamma=None),
      "edm": dict(alpha=jnp.ones_like, sigma=lambda t: t, t_min=1e-3, t_max=80.0,
                  t_of_gamma=lambda g: jnp.exp(0.5 * g)),
      "straight": dict(alpha=lambda t: 1.0 - t, sigma=lambda t: t, t_min=1e-4, t_max=1.0,
                       t_of_gamma=lambda g: jax.nn.sigmoid(0.5 * g)),
      "idode_vp": dict(alpha=lambda t: jnp.sqrt(jax.nn.sigmoid(-t)),
                       sigma=lambda t: jnp.sqrt(jax.nn.sigmoid(t)), t_min=-20.0, t_max=5.0,
                       t_of_gamma=lambda g: g),
      "idode_sp": dict(alpha=lambda t: jax.nn.sigmoid(-0.5 * t),
                       sigma=lambda t: jax.nn.sigmoid(0.5 * t),
                       t_min=-20.0, t_max=5.0, t_of_gamma=lambda g: g),
  }
  if name not in presets:
    raise ConfigError(f"unknown path {name!r}; expected one of {tuple(presets)}")
  return {**presets[name], **overrides}
