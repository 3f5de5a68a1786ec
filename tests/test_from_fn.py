"""dj.from_fn: a model written outside the project, checked against independent facts
(docs/own_model.md).

* Gaussian data N(m, s0^2 I) has exact predictors in every form and a linear probability
  flow, so the bound of one dequantization draw has a closed form given its start state.
* The closed-form oracle of a few images, written here as a user would (the posterior mean
  under the user's path), in the four forms on three paths: the tn bound on its training
  images is log2(N) / D + (-log2 erf(tau / sqrt 2)) whatever the path and data_range (the
  data_range's log-Jacobian is in it), and the forms agree with each other.
* A tiny project U-Net, its drift re-expressed by the user, gives the Model's per-image
  bits/dim with the same key at the same NFE.
* Bad input is one DiffodeError line.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

import diffode_jax as dj
from diffode_jax.errors import ConfigError, DataError, DiffodeError, LikelihoodError
from diffode_jax.likelihood import draw_noise

import procs

FORMS = ("eps", "x0", "score", "dx_dt")
SHAPE = (2, 2, 1)
DIM = 4


def _col(a):
  return a[:, None, None, None]


def _user_fn(predicts, alpha, sigma, predict_x0):
  """fn(params, x, t) in the form ``predicts`` from a posterior mean x0_hat(params, x, a, s):
  what a user writes for an exact model."""

  def fn(params, x, t):
    a, da = jax.jvp(alpha, (t,), (jnp.ones_like(t),))
    s, ds = jax.jvp(sigma, (t,), (jnp.ones_like(t),))
    a, s, da, ds = _col(a), _col(s), _col(da), _col(ds)
    x0 = predict_x0(params, x, a, s)
    eps = (x - a * x0) / s
    if predicts == "eps":
      return eps
    if predicts == "x0":
      return x0
    if predicts == "score":
      return -eps / s
    return da * x0 + ds * eps  # dx/dt along the path

  return fn


def _gaussian_x0(params, x, a, s):
  m, s2 = params["m"], jnp.exp(2 * params["log_s"])
  return m + a * s2 * (x - a * m) / (a**2 * s2 + s**2)


def _levels(n, v, seed=0):
  return np.random.RandomState(seed).randint(0, v, (n,) + SHAPE).astype(np.uint8)


def _gaussian_closed_form(model, params, k, key, settings, batch=0):
  """log N(x1; 0, sigma_1^2) + D/2 log(v1 / v0) of the linear flow from the start state
  (k: one whole batch, number ``batch`` of the evaluation)."""
  sched = model.components.schedule
  lo, hi = model.config.model.data_range
  scale, shift = (hi - lo) / 2, (hi + lo) / 2
  mp = (params["m"] - shift) / scale  # the Gaussian in the library's units
  s2p = jnp.exp(2 * params["log_s"]) / scale**2
  deq, _ = draw_noise(settings, sched, model.components.num_levels, jnp.asarray(k),
                      jax.random.fold_in(jax.random.fold_in(key, batch), 0))
  c0, c1 = sched.coefficients(jnp.float32(sched.gamma_min)), sched.coefficients(
      jnp.float32(sched.gamma_max))
  v0, v1 = c0.alpha**2 * s2p + c0.sigma**2, c1.alpha**2 * s2p + c1.sigma**2
  x1 = c1.alpha * mp + jnp.sqrt(v1 / v0) * (deq.z0 - c0.alpha * mp)
  prior = (-0.5 * (x1**2).reshape(len(k), -1).sum(1) / c1.sigma**2
           - DIM * (jnp.log(c1.sigma) + 0.5 * math.log(2 * math.pi)))
  return np.asarray(prior + 0.5 * DIM * jnp.log(v1 / v0) + deq.log_weight, np.float64)


@pytest.mark.parametrize("name,data_range", [("vp_linear", (0.0, 1.0)), ("edm", (-1.0, 1.0))])
def test_gaussian_data_gives_the_closed_form_in_every_form(name, data_range):
  params = {"m": jnp.full(SHAPE, 0.3 * data_range[1]), "log_s": jnp.float32(math.log(0.2))}
  path = dj.path(name, t_min=dj.path(name)["t_min"] / 4)  # cleaner: data_range (0, 1)
  k = _levels(3, 256)
  key = jax.random.PRNGKey(1)
  for predicts in FORMS:
    fn = _user_fn(predicts, path["alpha"], path["sigma"], _gaussian_x0)
    model = dj.from_fn(fn, params, predicts=predicts, **path, num_levels=256,
                       data_range=data_range, image_shape=SHAPE)
    settings = model.eval_settings(divergence="exact", rtol=1e-6, atol=1e-6)
    log_p = model.log_prob(k, key, settings=settings)
    want = _gaussian_closed_form(model, params, k, key, settings)
    np.testing.assert_allclose(log_p, want, atol=2e-3, err_msg=f"{name} {predicts}")


def _oracle_x0(train_y):
  def x0(params, x, a, s):
    del params
    d = x[:, None] - a[:, None] * train_y[None]  # (B, N, H, W, C)
    logits = -(d**2).reshape(d.shape[:2] + (-1,)).sum(-1) / (2 * s.reshape(-1, 1) ** 2)
    w = jax.nn.softmax(logits, axis=1)
    return jnp.einsum("bn,nhwc->bhwc", w, train_y)

  return x0


NUM_TRAIN, V = 4, 17


@pytest.fixture(scope="module")
def train_levels():
  return _levels(NUM_TRAIN, V, seed=3)


# gamma_max = 10 on the project's path: the N(0, sigma_max^2) prior then costs < 1e-4 bits/dim
ORACLE_T_MAX = {"idode_vp": 10.0}


@pytest.mark.parametrize("name,data_range", [("idode_vp", (-1.0, 1.0)),
                                             ("vp_cosine", (0.0, 1.0)),
                                             ("straight", (-1.0, 1.0))])
def test_user_written_oracle_gives_log2_n_over_d_in_every_form(train_levels, name, data_range):
  lo, hi = data_range
  train_y = jnp.asarray(lo + (hi - lo) * (train_levels.astype(np.float32) + 0.5) / V)
  path = dj.path(name, **({"t_max": ORACLE_T_MAX[name]} if name in ORACLE_T_MAX else {}))
  key = jax.random.PRNGKey(0)
  expected = math.log2(NUM_TRAIN) / DIM - math.log2(erf(3.0 / math.sqrt(2.0)))
  results = {}
  for predicts in FORMS:
    fn = _user_fn(predicts, path["alpha"], path["sigma"], _oracle_x0(train_y))
    model = dj.from_fn(fn, None, predicts=predicts, **path, num_levels=V,
                       data_range=data_range, image_shape=SHAPE)
    results[predicts], report = model.bpd(train_levels, key, divergence="exact",
                                          solver="dopri5", rtol=1e-5, atol=1e-5)
    assert "sde_bpd" not in report  # no training loss: omitted, not faked
    np.testing.assert_allclose(results[predicts], expected, atol=5e-3,
                               err_msg=f"{name} {predicts}")
  for predicts in FORMS[1:]:
    np.testing.assert_allclose(results[predicts], results["eps"], atol=1e-3)
  if name == "idode_vp":  # the project's own path: the project's oracle, same key
    import tiny

    config = tiny.config(data__image_size=SHAPE[0], model__gamma_max=ORACLE_T_MAX[name])
    config.eval.divergence = "exact"
    oracle = dj.oracle(train_levels, config)
    assert oracle.components.schedule.gamma_min == pytest.approx(
        model.components.schedule.gamma_min)
    ours, _ = oracle.bpd(train_levels, key, solver="dopri5", rtol=1e-5, atol=1e-5)  # same solve
    np.testing.assert_allclose(results["eps"], ours, atol=1e-3)


def test_path_schedule_is_consistent():
  for name in ("vp_linear", "vp_cosine", "edm", "straight"):
    path = dj.path(name, t_min=dj.path(name)["t_min"] / 4)
    model = dj.from_fn(lambda p, x, t: x, None, predicts="eps", **path, num_levels=256,
                       data_range=(0.0, 1.0), image_shape=SHAPE)
    sched = model.components.schedule
    g = jnp.linspace(sched.gamma_min, sched.gamma_max, 17)
    c = sched.coefficients(g)
    np.testing.assert_allclose(jnp.log(c.sigma**2 / c.alpha**2), g, atol=2e-4, err_msg=name)
    dalpha = jax.vmap(jax.grad(lambda x: sched.coefficients(x).alpha))(g)
    np.testing.assert_allclose(dalpha, c.dalpha, rtol=2e-3, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(c.dlog_alpha, c.dalpha / c.alpha, rtol=1e-4, err_msg=name)
    # sigma in the library's units is the user's over (hi - lo) / 2
    t = sched.path.t_of_gamma(g)
    np.testing.assert_allclose(c.sigma, path["sigma"](t) / 0.5, rtol=1e-5)


@pytest.mark.parametrize("overrides,tol,same_nfe", [
    ({}, 1e-4, True), ({"num_importance": 2, "divergence": "exact"}, 1e-4, True),
    ({"dequantization": "u"}, 1e-6, False)], ids=["tn", "K2-exact", "u"])
def test_tiny_project_model_through_from_fn_gives_the_same_bpd(overrides, tol, same_nfe):
  """Evaluation settings reach a from_fn model as they reach the project's own: the same
  per-image bits/dim (and NFE) under tn, K = 2 with the exact trace, and u. The u start
  (gamma_u, a uniform point in the bin) is worse conditioned on this untrained field: at
  rtol 1e-4 the two solves differ by up to 0.034 bits/dim, at 1e-6 by 7e-4 (measured), so
  u is compared at 1e-6, where the step sequences differ slightly (703 and 727 NFE)."""
  import tiny
  from diffode_jax import data
  from diffode_jax.config import finalize_config
  from diffode_jax.model import build

  config = finalize_config(tiny.config())
  components = build(config)
  params = components.init_params(jax.random.PRNGKey(0))
  # The zero-initialized output convolution perturbed: a smooth field that is not x itself.
  # (Perturbing every weight gives a field so ill-conditioned that a 1e-7 relative change
  # of the drift moves the bound by 1e-2 bits/dim: no wrapper can match that.)
  out = params["Conv_1"]["kernel"]
  params["Conv_1"]["kernel"] = 0.05 * jax.random.normal(jax.random.PRNGKey(1), out.shape)
  direct = dj.Model(config, components, params)
  path = dj.path("idode_vp", t_max=config.model.gamma_max)

  def fn(params, x, t):  # the velocity network of the VP path: dx/dgamma = sigma alpha / 2 F
    f = components.net_fn(params, x, t, None, False)
    return _col(0.5 * path["sigma"](t) * path["alpha"](t)) * f

  mine = dj.from_fn(fn, params, predicts="dx_dt", **path, num_levels=config.data.num_levels,
                    data_range=(-1, 1), image_shape=(8, 8, 1))
  images = data.load_split(config.data, "test").images[:4]
  key = jax.random.PRNGKey(5)
  settings = direct.eval_settings(rtol=tol, atol=tol, **overrides)
  rows_direct, _ = direct.per_image(images, key, settings=settings)
  rows_mine, report = mine.per_image(images, key, settings=settings)
  # The two drifts agree to float32 roundoff (about 1e-7 relative: autodiff coefficients
  # against closed forms); this untrained network amplifies that to about 1e-3 bits/dim at
  # rtol 1e-4, far below its solver error (0.02-0.1 bits/dim between rtol 1e-4 and 1e-6).
  np.testing.assert_allclose([r["bpd"] for r in rows_mine], [r["bpd"] for r in rows_direct],
                             atol=3e-3)
  assert ([r["nfe"] for r in rows_mine] == [r["nfe"] for r in rows_direct]) or not same_nfe
  assert "sde_bpd" in rows_direct[0] and "sde_bpd" not in rows_mine[0]
  assert report["arch"] == "from_fn" and report["parameterization"] == "dx_dt"


def test_log_prob_fn_gradient_matches_central_difference():
  with jax.enable_x64(True):
    path = dj.path("vp_cosine")
    params = {"m": jnp.asarray(np.random.RandomState(0).normal(0, 0.2, SHAPE)),
              "log_s": jnp.float64(math.log(0.3))}
    fn = _user_fn("eps", path["alpha"], path["sigma"], _gaussian_x0)
    model = dj.from_fn(fn, params, predicts="eps", **path, num_levels=256,
                       data_range=(-1, 1), image_shape=SHAPE)
    log_prob = model.log_prob_fn(divergence="exact", rtol=1e-10, atol=1e-10)
    k = jnp.asarray(_levels(2, 256, seed=4))
    key = jax.random.PRNGKey(2)
    total = jax.jit(lambda p: log_prob(p, k, key).sum())
    value, grad = jax.value_and_grad(total)(params)
    assert value.dtype == jnp.float64 and np.isfinite(value)
    direction = {"m": jnp.asarray(np.random.RandomState(1).normal(0, 1, SHAPE)),
                 "log_s": jnp.float64(0.7)}
    h = 1e-4
    shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * h * d, params, direction)
    fd = (total(shifted(1)) - total(shifted(-1))) / (2 * h)
    ad = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-4)
  # float32, the same noise: the pure function is the evaluator's bound
  model32 = dj.from_fn(fn, jax.tree.map(lambda p: p.astype(jnp.float32), params),
                       predicts="eps", **path, num_levels=256, data_range=(-1, 1),
                       image_shape=SHAPE)
  k32 = _levels(2, 256, seed=4)
  pure = jax.jit(model32.log_prob_fn(divergence="exact"))(
      model32.params, k32, jax.random.fold_in(key, 0))
  np.testing.assert_allclose(pure, model32.log_prob(k32, key, divergence="exact"), rtol=1e-6)


def _one_line(err):
  assert isinstance(err.value, DiffodeError)
  assert "\n" not in str(err.value)
  return str(err.value)


def _build(fn=lambda p, x, t: x, **kw):
  args = dict(predicts="eps", **dj.path("vp_cosine"), num_levels=256, data_range=(-1, 1),
              image_shape=SHAPE)
  args.update(kw)
  return dj.from_fn(fn, None, **args)


def test_bad_fn_and_path_are_one_line_errors():
  with pytest.raises(ConfigError) as err:
    _build(lambda p, x, t: x[..., 0])
  assert "x's shape" in _one_line(err)
  with pytest.raises(ConfigError) as err:
    _build(lambda p, x, t: x.astype(jnp.bfloat16))
  assert "dtype" in _one_line(err)
  with pytest.raises(ConfigError) as err:
    _build(lambda p, x, t: x @ jnp.ones((3, 3)))
  assert "fails on x" in _one_line(err)
  with pytest.raises(ConfigError) as err:
    _build(predicts="velocity")
  assert "unknown predicts" in _one_line(err)
  with pytest.raises(ConfigError) as err:  # SNR rises again after t = 0.5
    _build(alpha=lambda t: 1.0 - t + 2 * jax.nn.relu(t - 0.5), sigma=lambda t: t,
           t_min=1e-4, t_max=1.0, t_of_gamma=None)
  assert "monotonically" in _one_line(err) and "t=0.5" in str(err.value)
  with pytest.raises(ConfigError) as err:
    _build(**dj.path("edm", t_max=5.0))
  assert "does not reach noise" in _one_line(err)
  with pytest.raises(ConfigError) as err:  # 80 is not noise for data in [0, 255]
    _build(**dj.path("edm"), data_range=(0, 255))
  assert "does not reach noise" in _one_line(err)
  with pytest.raises(ConfigError) as err:  # EDM's sigma_min 0.002 is too noisy for tn at 8 bits
    _build(**dj.path("edm", t_min=0.002))
  msg = _one_line(err)
  assert "too noisy" in msg and "use t_min <= 0.0013" in msg, msg
  _build(**dj.path("edm", t_min=0.0013))  # and that t_min does
  with pytest.raises(ConfigError) as err:
    _build(data_range=(1, -1))
  _one_line(err)
  with pytest.raises(ConfigError) as err:
    dj.path("cosine")
  _one_line(err)


def test_bad_images_and_nonfinite_fn_are_one_line_errors():
  model = _build()
  key = jax.random.PRNGKey(0)
  with pytest.raises(DataError) as err:
    model.bpd(_levels(2, 256).astype(np.float32) / 255, key)
  assert "integers" in _one_line(err)
  with pytest.raises(DataError) as err:
    model.bpd(_levels(2, 256).astype(np.int32) + 200, key)
  assert "does not fit" in _one_line(err)
  with pytest.raises(DataError) as err:
    model.bpd(_levels(2, 256).astype(np.int32) - 300, key)
  assert "negative" in _one_line(err)

  def nan_fn(params, x, t):  # NaN for bright images (mean > 0.5) near the data
    bright = (x.reshape(x.shape[0], -1).mean(1) > 0.5) & (t < 0.3)
    return jnp.where(_col(bright), jnp.nan, x)

  images = np.zeros((3,) + SHAPE, np.uint8)
  images[2] = 250
  with pytest.raises(LikelihoodError) as err:
    _build(nan_fn).bpd(images, key, rtol=1e-3, atol=1e-3, max_steps=64)
  msg = _one_line(err)
  assert "image 2 at t=0.0001" in msg, msg


def test_user_written_oracle_samples_are_training_images(train_levels):
  """Sampling runs the user's path backwards: the oracle's flow ends on its training points
  (up to a pixel off by one level, as tests/test_oracle.py)."""
  path = dj.path("straight")
  train_y = jnp.asarray((2.0 * train_levels.astype(np.float32) + 1.0) / V - 1.0)
  fn = _user_fn("dx_dt", path["alpha"], path["sigma"], _oracle_x0(train_y))
  model = dj.from_fn(fn, None, predicts="dx_dt", **path, num_levels=V, data_range=(-1, 1),
                     image_shape=SHAPE)
  samples = model.sample(jax.random.PRNGKey(3), 8, batch_size=8)
  assert samples.dtype == np.uint8 and samples.shape == (8,) + SHAPE
  flat_train = train_levels.reshape(NUM_TRAIN, -1).astype(int)
  for s in samples.reshape(8, -1).astype(int):
    assert np.abs(flat_train - s).sum(axis=1).min() <= 1


def test_the_examples_of_docs_own_model_run():
  """docs/own_model.md's Python blocks, run in order with 20 training steps (the document
  says 2000): each builds its model through from_fn and prints a finite bits/dim."""
  import contextlib
  import io
  import os
  import re

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "docs", "own_model.md"), encoding="utf-8") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  source = "\n".join(blocks)
  assert "STEPS = 2000" in source
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(source.replace("STEPS = 2000", "STEPS = 20"), "own_model.md", "exec"), {})
  lines = out.getvalue().splitlines()
  assert [line.rsplit(" ", 1)[0] for line in lines] == ["EDM denoiser", "rectified flow",
                                                         "DDPM eps"]
  assert all(math.isfinite(float(line.rsplit(" ", 1)[1])) for line in lines)


def test_with_params_evaluates_the_new_params_and_refuses_another_structure():
  """model.with_params(p) gives the bits/dim of from_fn(..., p); a params tree of another
  structure is one ConfigError."""
  path = dj.path("vp_cosine")

  def fn(p, x, t):
    return p["w"] * x

  args = dict(predicts="eps", **path, num_levels=17, data_range=(-1, 1), image_shape=(4, 4, 1))
  images = np.random.default_rng(0).integers(0, 17, (4, 4, 4, 1))
  key = jax.random.PRNGKey(1)
  base = dj.from_fn(fn, {"w": jnp.float32(0.0)}, **args)
  moved = base.with_params({"w": jnp.float32(0.3)})
  direct = dj.from_fn(fn, {"w": jnp.float32(0.3)}, **args)
  np.testing.assert_array_equal(moved.bpd(images, key)[0], direct.bpd(images, key)[0])
  assert not np.array_equal(moved.bpd(images, key)[0], base.bpd(images, key)[0])
  with pytest.raises(ConfigError, match="structure"):
    base.with_params({"v": jnp.float32(0.3)})


def test_the_likelihood_finetune_example_runs():
  """examples/likelihood_finetune.py at a tiny budget: every model gets a finite test
  bits/dim, one loss per fine-tune step, and the fine-tune moved the params (its full run
  is quoted in docs/own_model.md)."""
  import importlib.util

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "likelihood_finetune", os.path.join(root, "examples", "likelihood_finetune.py"))
  example = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = example  # flax's dataclass modules look their module up
  try:
    spec.loader.exec_module(example)
  finally:
    del sys.modules[spec.name]
  results = example.run(pretrain_steps=5, finetune_steps=2, test_images=8, batch=8,
                        finetune_lr=1e-3, width=8)
  assert len(results["finetune_losses"]) == 2
  assert all(math.isfinite(v) for v in results["finetune_losses"])
  names = ("pretrained", "likelihood fine-tune", "control (flow matching)")
  for name in names:
    assert results[name]["bpd"].shape == (8,) and np.isfinite(results[name]["bpd"]).all()
  assert not np.array_equal(results["pretrained"]["bpd"], results["likelihood fine-tune"]["bpd"])


def _gaussian_rows(batch_size):
  """per_image of the exact Gaussian model (eps form, VP linear path) on eight images in
  whole batches: the rows, the report's device count, and the closed form."""
  params = {"m": jnp.full(SHAPE, 0.3), "log_s": jnp.float32(math.log(0.2))}
  path = dj.path("vp_linear", t_min=dj.path("vp_linear")["t_min"] / 4)  # clean enough for tn
  model = dj.from_fn(_user_fn("eps", path["alpha"], path["sigma"], _gaussian_x0), params,
                     predicts="eps", **path, num_levels=256, data_range=(0.0, 1.0),
                     image_shape=SHAPE)
  settings = model.eval_settings(divergence="exact", rtol=1e-6, atol=1e-6)
  k, key = _levels(8, 256, seed=5), jax.random.PRNGKey(2)
  rows, report = model.per_image(k, key, batch_size, settings=settings)
  want = np.concatenate([
      _gaussian_closed_form(model, params, k[b:b + batch_size], key, settings, b // batch_size)
      for b in range(0, len(k), batch_size)])
  return rows, report["num_devices"], want


@pytest.mark.subprocess
def test_a_users_model_splits_its_batches_over_devices():
  """The same user model in a process with two devices: each batch is split over both
  (the report says 2), every image keeps its closed-form bound, and the rows equal the
  one-device rows (one step control for the whole batch: the same NFE)."""
  code = ("import json, sys; sys.path.insert(0, 'tests'); import test_from_fn as t; "
          "rows, devices, want = t._gaussian_rows(4); "
          "print(json.dumps({'rows': rows, 'devices': devices, 'want': want.tolist()}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=procs.REPO, env=procs.env(devices=2),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  two = json.loads(out.stdout.strip().splitlines()[-1])
  one_rows, one_devices, _ = _gaussian_rows(4)
  assert (two["devices"], one_devices) == (2, jax.local_device_count())
  assert [r["index"] for r in two["rows"]] == list(range(8))
  np.testing.assert_allclose([r["log_prob"] for r in two["rows"]], two["want"], atol=2e-3)
  np.testing.assert_allclose([r["log_prob"] for r in two["rows"]],
                             [r["log_prob"] for r in one_rows], rtol=1e-5)
  assert [r["nfe"] for r in two["rows"]] == [r["nfe"] for r in one_rows]
