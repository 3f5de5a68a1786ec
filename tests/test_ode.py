"""The augmented probability-flow ODE (docs/design.md, The augmented ODE) on Gaussian data, where
everything is exact.

Data x ~ N(0, S) with S = Q diag(lam) Q^T (pixels correlated, so Hutchinson is not exact)
has marginals x_g ~ N(0, V(g)), V = alpha^2 S + sigma^2 I = Q diag(v) Q^T. The linear
field dx/dg = 0.5 V' V^-1 x transports N(0, V(g0)) to N(0, V(g1)) (V and V' commute), so

    log N(x1; 0, V1) + integral of div = log N(x0; 0, V0)     exactly,

and with a probe v the Hutchinson integral is v^T A v, A = Q diag(0.5 log(v(g1)/v(g0))) Q^T.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax import ode
from diffode_jax.evaluation import check_bound
from diffode_jax.likelihood import (Bound, EvalSettings, LikelihoodError,
                                    make_log_prob_fn, prior_log_density)
from diffode_jax.schedules import Schedule, default_gamma_min

SHAPE = (2, 2, 1)
DIM = 4
GAMMA0 = default_gamma_min(17)  # -7.86
GAMMA1 = 5.0
LAM = np.array([0.05, 0.3, 1.0, 2.0])
_Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, DIM)))


def _variances(schedule, gamma):
  """v_i(gamma) = alpha^2 lam_i + sigma^2 (the eigenvalues of V)."""
  return schedule.alpha(gamma)**2 * jnp.array(LAM.tolist()) + schedule.sigma(gamma)**2


def gaussian_drift(schedule):
  """The exact probability-flow drift 0.5 V' V^-1 x of N(0, S) data, batch x scalar gamma."""
  q = jnp.array(_Q.tolist())

  def drift(x, gamma):
    v, dv = jax.jvp(lambda g: _variances(schedule, g), (gamma,), (jnp.ones_like(gamma),))
    flat = x.reshape(x.shape[0], -1)
    out = ((flat @ q) * (0.5 * dv / v).astype(x.dtype)) @ q.T
    return out.reshape(x.shape)

  return drift


def _variances_np(schedule, gamma):
  """The same eigenvalues in float64 numpy, from the schedule table of docs/design.md."""
  if schedule.name == "VP":
    alpha2, sigma2 = 1 / (1 + math.exp(gamma)), 1 / (1 + math.exp(-gamma))
  else:
    sigma = 1 / (1 + math.exp(-gamma / 2))
    alpha2, sigma2 = (1 - sigma)**2, sigma**2
  return alpha2 * LAM + sigma2


def _log_normal(x, schedule, gamma):
  """log N(x; 0, V(gamma)) per example in float64 numpy."""
  v = _variances_np(schedule, gamma)
  y = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ _Q
  return -0.5 * np.sum(y**2 / v + np.log(2 * math.pi * v), axis=-1)


def _hutchinson_matrix(schedule):
  v0, v1 = _variances_np(schedule, GAMMA0), _variances_np(schedule, GAMMA1)
  return _Q @ np.diag(0.5 * np.log(v1 / v0)) @ _Q.T


def _x0(schedule, batch, seed, dtype):
  """Draws from N(0, V(gamma0))."""
  v0 = _variances_np(schedule, GAMMA0)
  y = np.random.default_rng(seed).standard_normal((batch, DIM)) * np.sqrt(v0)
  return jnp.asarray((y @ _Q.T).reshape((batch,) + SHAPE), dtype)


def _solve(schedule, x0, probe, cfg):
  field = ode.augmented_vector_field(gaussian_drift(schedule), probe)
  y0 = (x0, jnp.zeros(x0.shape[0], x0.dtype))
  return jax.jit(lambda y: ode.solve_diffrax(field, y, GAMMA0, GAMMA1, cfg))(y0)


@pytest.fixture(params=["VP", "SP"])
def schedule(request):
  return Schedule(request.param, GAMMA0, GAMMA1)


def test_exact_divergence_likelihood_float64(schedule):
  with jax.enable_x64(True):
    x0 = _x0(schedule, 8, 1, jnp.float64)
    cfg = ode.SolverConfig(solver="tsit5", rtol=1e-9, atol=1e-9)
    (x1, delta), nfe, ok = _solve(schedule, x0, None, cfg)
    assert bool(ok) and int(nfe) > 7
    got = _log_normal(x1, schedule, GAMMA1) + np.asarray(delta)
    expected = _log_normal(x0, schedule, GAMMA0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(delta, np.trace(_hutchinson_matrix(schedule)), rtol=1e-7)
    # the library's N(0, sigma_max^2 I) prior differs from the exact marginal by a known
    # amount; it is log N(x1; 0, sigma_1^2 I) written out
    sigma1 = float(schedule.sigma(jnp.float64(GAMMA1)))
    direct = np.sum(jax.scipy.stats.norm.logpdf(np.asarray(x1).reshape(8, -1), 0.0, sigma1), -1)
    np.testing.assert_allclose(prior_log_density(x1, schedule), direct, rtol=1e-12)
    mismatch = np.asarray(prior_log_density(x1, schedule)) - _log_normal(x1, schedule, GAMMA1)
    assert np.all(np.abs(mismatch) > 1e-3)  # so the exact marginal matters above


def test_exact_divergence_likelihood_float32_default_tolerances():
  schedule = Schedule("VP", GAMMA0, GAMMA1)
  x0 = _x0(schedule, 8, 2, jnp.float32)
  (x1, delta), _, ok = _solve(schedule, x0, None, ode.SolverConfig(solver="tsit5"))
  assert bool(ok)
  assert x1.dtype == jnp.float32
  got = _log_normal(x1, schedule, GAMMA1) + np.asarray(delta, np.float64)
  expected = _log_normal(x0, schedule, GAMMA0)
  np.testing.assert_allclose(got, expected, rtol=1e-3)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased(kind):
  schedule = Schedule("VP", GAMMA0, GAMMA1)
  batch = 256
  with jax.enable_x64(True):
    x0 = _x0(schedule, batch, 3, jnp.float64)
    probe = ode.draw_probe(kind, jax.random.PRNGKey(4), x0.shape, jnp.float64)
    if kind == "rademacher":
      assert set(np.unique(np.asarray(probe))) == {-1.0, 1.0}
    (x1, delta), _, ok = _solve(schedule, x0, probe,
                                ode.SolverConfig(solver="tsit5", rtol=1e-7, atol=1e-7))
  assert bool(ok)
  # per probe the estimate is exactly v^T A v (a linear field)
  a = _hutchinson_matrix(schedule)
  v = np.asarray(probe, np.float64).reshape(batch, -1)
  np.testing.assert_allclose(delta, np.einsum("ni,ij,nj->n", v, a, v), rtol=1e-5, atol=1e-6)
  # and over probes the likelihood is unbiased
  err = _log_normal(x1, schedule, GAMMA1) + np.asarray(delta) - _log_normal(x0, schedule, GAMMA0)
  stderr = err.std(ddof=1) / math.sqrt(batch)
  assert stderr > 1e-3  # a genuine estimator, not the exact trace
  assert abs(err.mean()) < 4 * stderr, (err.mean(), stderr)


def _nonlinear_drift(x, gamma):
  """Per-image, pixel-mixing and nonlinear."""
  w = jnp.asarray(np.random.default_rng(5).standard_normal((DIM, DIM)), x.dtype)
  flat = x.reshape(x.shape[0], -1)
  return (jnp.tanh(flat @ w + jnp.sin(gamma)) * flat**2).reshape(x.shape)


def test_exact_trace_matches_jacobian():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (3,) + SHAPE, jnp.float64)
    gamma = jnp.float64(0.7)
    probe = ode.draw_probe("gaussian", jax.random.PRNGKey(1), x.shape, jnp.float64)

    @jax.jit
    def compute(x, probe):
      dx, div = ode.drift_and_divergence(_nonlinear_drift, x, gamma, None)
      _, est = ode.drift_and_divergence(_nonlinear_drift, x, gamma, probe)
      single = lambda y: _nonlinear_drift(y.reshape((1,) + SHAPE), gamma).reshape(-1)
      jacs = jax.vmap(jax.jacfwd(single))(x.reshape(3, -1))
      return dx, div, est, jacs, _nonlinear_drift(x, gamma)

    dx, div, est, jacs, direct = compute(x, probe)
    np.testing.assert_allclose(dx, direct, rtol=1e-14)
    np.testing.assert_allclose(div, np.trace(jacs, axis1=1, axis2=2), rtol=1e-12)
    # Hutchinson with a given probe is v^T J v
    p = np.asarray(probe).reshape(3, -1)
    np.testing.assert_allclose(est, np.einsum("ni,nij,nj->n", p, jacs, p), rtol=1e-12)
    assert np.all(np.abs(est - div) > 1e-6)  # the probe estimate is not the trace itself
    assert ode.draw_probe("exact", jax.random.PRNGKey(0), x.shape) is None
    with pytest.raises(ValueError):
      ode.draw_probe("sphere", jax.random.PRNGKey(0), x.shape)


@pytest.mark.parametrize("solver", sorted(ode.DIFFRAX_SOLVERS))
def test_nfe_formula_counts_every_evaluation(solver):
  count = [0]

  def tick():
    count[0] += 1

  inner = ode.augmented_vector_field(_nonlinear_drift, None)

  def field(gamma, state, args):
    jax.debug.callback(tick)
    return inner(gamma, state, args)

  x0 = jax.random.normal(jax.random.PRNGKey(1), (2,) + SHAPE)
  cfg = ode.SolverConfig(solver=solver, rtol=1e-6, atol=1e-6)
  solve = jax.jit(lambda y: ode.solve_diffrax(field, y, -2.0, 2.0, cfg))
  _, nfe, ok = jax.block_until_ready(solve((x0, jnp.zeros(2))))
  assert bool(ok)
  assert int(nfe) == count[0] and count[0] > 20


def test_scipy_and_diffrax_agree_with_closed_form():
  """dx/dg = 0.3 cos(g) x: x1 = x0 exp(0.3 (sin g1 - sin g0)), l1 = D * 0.3 (sin g1 - sin g0)."""
  drift = lambda x, g: 0.3 * jnp.cos(g) * x
  field = ode.augmented_vector_field(drift, None)
  x0 = jax.random.normal(jax.random.PRNGKey(2), (3,) + SHAPE)
  y0 = (x0, jnp.zeros(3))
  g0, g1 = -3.0, 4.0
  growth = 0.3 * (math.sin(g1) - math.sin(g0))
  cfg = ode.SolverConfig(rtol=1e-6, atol=1e-6)
  for solver in ("tsit5", "scipy_rk45"):
    c = ode.SolverConfig(solver=solver, rtol=cfg.rtol, atol=cfg.atol)
    if solver == "scipy_rk45":
      (x1, l1), nfe, ok = ode.solve_scipy(field, y0, g0, g1, c)
    else:
      (x1, l1), nfe, ok = jax.jit(lambda y: ode.solve_diffrax(field, y, g0, g1, c))(y0)
    assert bool(ok) and int(nfe) >= 7  # at least one step of 6 evaluations, plus 1
    np.testing.assert_allclose(x1, np.asarray(x0) * math.exp(growth), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(l1, DIM * growth, rtol=2e-5)
  with pytest.raises(ValueError):
    ode.SolverConfig(solver="euler")


def test_failed_solve_is_reported():
  """max_steps exhausted: solve_diffrax reports it, the bound carries it, check_bound
  raises (the same drift with enough steps succeeds in the tests above)."""
  schedule = Schedule("VP", GAMMA0, GAMMA1)
  drift = gaussian_drift(schedule)
  settings = EvalSettings(dequantization="tn", divergence="exact",
                          solver=ode.SolverConfig(solver="tsit5", max_steps=2))
  log_prob = make_log_prob_fn(lambda params, x, g: drift(x, g), schedule, 17, settings)
  k = jnp.asarray(np.arange(2 * DIM).reshape((2,) + SHAPE) % 17)
  bound = log_prob(None, k, jax.random.PRNGKey(0))
  assert bound.success is False
  with pytest.raises(LikelihoodError, match="max_steps"):
    check_bound(bound, settings)
  # a finite, successful bound passes; a NaN one does not
  check_bound(Bound(np.array([-3.0, -2.0]), [13], True), settings)
  with pytest.raises(LikelihoodError, match="finite"):
    check_bound(Bound(np.array([-3.0, np.nan]), [13], True), settings)


def test_library_defaults_are_the_config_defaults():
  """EvalSettings(), SampleSettings() and SolverConfig() are what configs/default.py runs."""
  from configs import default
  from diffode_jax.sampling import SampleSettings

  config = default.get_config()
  e, s = EvalSettings(), SampleSettings()
  for settings, section in ((e, config.eval), (s, config.sample)):
    solver = settings.solver
    assert (solver.solver, solver.rtol, solver.atol, solver.max_steps, solver.norm,
            solver.time) == (section.solver, section.rtol, section.atol, section.max_steps,
                             section.norm, section.time)
  assert (e.dequantization, e.num_importance, e.analytic_entropy, e.divergence) == (
      config.eval.dequantization, config.eval.num_importance, config.eval.analytic_entropy,
      config.eval.divergence)
  assert s.decode == config.sample.decode
  # gamma_u follows the bit depth (schedules.default_gamma_u): required with "u" only
  assert e.gamma_u is None and config.eval.gamma_u is None
  with pytest.raises(ValueError, match="gamma_u"):
    EvalSettings(dequantization="u")


def test_chunked_exact_trace_matches_the_one_vmap_trace():
  """eval.exact_trace_chunk = c evaluates the D basis tangents c at a time
  (jax.lax.map): the one-vmap trace to float32 roundoff, with temporaries that shrink
  with c. Not bit for bit on XLA:CPU, which compiles a product of few rows and
  GroupNorm's tangent reductions differently for c and for D tangents (measured: dots
  of fewer than 20-64 rows; GroupNorm at any two vmap sizes)."""
  from diffode_jax.networks.unet import UNet

  net = UNet(channels=8, num_blocks=1, embed_dim=16, num_groups=4, attention=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  params = net.init({"params": jax.random.key(1, impl="rbg")}, x, jnp.zeros((4,)))["params"]
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(2)  # the zero-initialized output layer makes a trivial drift
  params = jax.tree.unflatten(tree, [l + 0.05 * jnp.asarray(rng.standard_normal(l.shape),
                                                               l.dtype) for l in leaves])
  drift = lambda y, g: net.apply({"params": params}, y, g)

  def trace(chunk):
    fn = jax.jit(lambda x: ode.drift_and_divergence(drift, x, jnp.float32(0.3), None, chunk))
    return fn(x), fn.lower(x).compile().memory_analysis().temp_size_in_bytes

  (dx, one_vmap), full_bytes = trace(None)
  assert np.array_equal(trace(64)[0][1], one_vmap)  # c >= D is the one vmap itself
  temps = []
  for chunk in (7, 16):  # 64 = 9 * 7 + 1: a remainder chunk too
    (dx_c, div), temp_bytes = trace(chunk)
    np.testing.assert_array_equal(dx_c, dx)
    np.testing.assert_allclose(div, one_vmap, rtol=1e-5)
    temps.append(temp_bytes)
  assert temps[0] < temps[1] < full_bytes / 2, (temps, full_bytes)


@pytest.mark.parametrize("solver", sorted(ode.DIFFRAX_SOLVERS))
@pytest.mark.parametrize("time", ode.TIMES)
def test_every_solver_and_time_variable_gives_the_closed_form(solver, time):
  """A change of time variable (and of solver, and of error norm) changes where the steps
  fall, not the solution: each reaches the Gaussian's exact log-density."""
  schedule = Schedule("VP", GAMMA0, GAMMA1)
  with jax.enable_x64(True):
    x0 = _x0(schedule, 4, 5, jnp.float64)
    norm = "image_leaf_max" if time == "angle" else "rms"
    cfg = ode.SolverConfig(solver=solver, rtol=1e-9, atol=1e-9, time=time, norm=norm,
                           max_steps=20_000)
    (x1, delta), nfe, ok = _solve(schedule, x0, None, cfg)
    assert bool(ok) and int(nfe) > 7
    got = _log_normal(x1, schedule, GAMMA1) + np.asarray(delta)
  np.testing.assert_allclose(got, _log_normal(x0, schedule, GAMMA0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("time", ode.TIMES)
def test_time_variables_invert_and_differentiate(time):
  var = ode.TIME_VARIABLES[time]
  with jax.enable_x64(True):
    gamma = jnp.linspace(-14.0, 12.0, 27)
    s = var.of_gamma(gamma)
    assert np.all(np.diff(np.asarray(s)) > 0)  # increasing in gamma
    np.testing.assert_allclose(var.to_gamma(s), gamma, rtol=1e-12, atol=1e-12)
    h = 1e-6 * np.abs(np.asarray(s))
    central = (var.to_gamma(s + h) - var.to_gamma(s - h)) / (2 * h)  # central difference
    np.testing.assert_allclose(var.dgamma_ds(s), central, rtol=1e-6)


@pytest.mark.parametrize("num_rows", [None, 3])
def test_error_norms_equal_their_formulas(num_rows):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((5, 2, 2, 3)).astype(np.float32)
  l = (10 * rng.standard_normal(5)).astype(np.float32)
  n = 5 if num_rows is None else num_rows
  ex, el = x[:n].reshape(n, -1).astype(np.float64), l[:n].astype(np.float64)
  per_image = np.sqrt(((ex**2).sum(1) + el**2) / (ex.shape[1] + 1))
  want = {
      "rms": np.sqrt(((ex**2).sum() + (el**2).sum()) / (n * (ex.shape[1] + 1))),
      "image_max": per_image.max(),
      "leaf_max": max(np.sqrt((ex**2).mean()), np.sqrt((el**2).mean())),
      "image_leaf_max": max(np.sqrt((ex**2).mean(1)).max(), np.abs(el).max()),
  }
  assert set(want) == set(ode.NORMS)
  for kind, value in want.items():
    got = float(ode.error_norm(kind, num_rows)((jnp.asarray(x), jnp.asarray(l))))
    np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=kind)
  # padding rows take no part
  if num_rows is not None:
    x2 = x.copy()
    x2[num_rows:] = 1e6
    for kind in ode.NORMS:
      assert float(ode.error_norm(kind, num_rows)((jnp.asarray(x2), jnp.asarray(l)))) == \
          pytest.approx(want[kind], rel=1e-6)


def test_solver_config_rejects_unknown_options():
  with pytest.raises(ValueError, match="error norm"):
    ode.SolverConfig(norm="l1")
  with pytest.raises(ValueError, match="time variable"):
    ode.SolverConfig(time="t")
  with pytest.raises(ValueError, match="scipy_rk45"):
    ode.SolverConfig(solver="scipy_rk45", time="sigma")


def test_norm_and_time_fields_reach_the_solver():
  """eval.norm / eval.time and sample.norm / sample.time set the solves' SolverConfig;
  the host loop refuses them (one line)."""
  from configs import digits
  from diffode_jax.config import eval_settings, finalize_config
  from diffode_jax.errors import ConfigError
  from diffode_jax.sampling import sample_settings

  config = digits.get_config()
  config.eval.norm, config.eval.time = "image_max", "angle"
  config.sample.norm, config.sample.time = "leaf_max", "sigma"
  config = finalize_config(config)
  solver = eval_settings(config).solver
  assert (solver.norm, solver.time) == ("image_max", "angle")
  solver = sample_settings(config).solver
  assert (solver.norm, solver.time) == ("leaf_max", "sigma")
  with pytest.raises(ConfigError, match="scipy_rk45"):
    eval_settings(config, solver="scipy_rk45")
