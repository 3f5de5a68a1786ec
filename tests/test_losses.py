"""Training objectives (docs/design.md, Losses) against Gaussian closed forms, quadrature and Monte
Carlo.

For data x ~ N(mu, s^2 I) the noisy marginal is x_g ~ N(alpha mu, v I) with
v = alpha^2 s^2 + sigma^2, and the exact posterior means are

    E[eps | x_g] = sigma (x_g - alpha mu) / v,   E[x | x_g] = mu + alpha s^2 (x_g - alpha mu) / v,

so the exact network output E[F* | x_g] and its divergence are closed-form for every
parameterization (written here from the targets of docs/design.md, not through the library).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax.discretization import bin_centre
from diffode_jax.losses import (LossConfig, make_loss_fn, prior_kl, reconstruction_loss)
from diffode_jax.parameterization import Parameterization
from diffode_jax.schedules import Schedule, default_gamma_min
from diffode_jax.time_sampling import TimeSampler

DIM = 4
KINDS = [("eps", "VP"), ("eps", "SP"), ("velocity", "VP"), ("velocity", "SP")]
IDS = [f"{k}-{s}" for k, s in KINDS]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _alpha_sigma(name, gamma):
  """From the schedule table of docs/design.md in numpy float64."""
  gamma = np.asarray(gamma, np.float64)
  if name == "VP":
    return np.sqrt(1 / (1 + np.exp(gamma))), np.sqrt(1 / (1 + np.exp(-gamma)))
  sigma = 1 / (1 + np.exp(-gamma / 2))
  return 1 - sigma, sigma


def _target(kind, name, x, eps, alpha, sigma):
  if kind == "eps":
    return eps
  if name == "VP":
    return alpha * eps - sigma * x
  return (eps - x) / math.sqrt(2)


def _gaussian_model(kind, name, x_g, alpha, sigma, mu, s):
  """(E[F* | x_g], tr dE[F* | x_g]/dx_g per example) for x ~ N(mu, s^2 I)."""
  v = alpha**2 * s**2 + sigma**2
  eps_post = sigma * (x_g - alpha * mu) / v
  x_post = mu + alpha * s**2 * (x_g - alpha * mu) / v
  d_eps, d_x = sigma / v, alpha * s**2 / v  # per-dimension derivatives
  dim = x_g.shape[-1]
  if kind == "eps":
    return eps_post, dim * d_eps
  if name == "VP":
    return alpha * eps_post - sigma * x_post, dim * (alpha * d_eps - sigma * d_x)
  return (eps_post - x_post) / math.sqrt(2), dim * (d_eps - d_x) / math.sqrt(2)


def _residuals(kind, name, gamma, n, seed, mu=0.3, s=0.5, model_mu=None, model_s=None):
  """Monte Carlo draws of the second-order residual e at a fixed gamma."""
  rng = np.random.default_rng(seed)
  x = mu + s * rng.standard_normal((n, DIM))
  eps = rng.standard_normal((n, DIM))
  alpha, sigma = _alpha_sigma(name, gamma)
  x_g = alpha * x + sigma * eps
  f, div = _gaussian_model(kind, name, x_g, alpha, sigma,
                           mu if model_mu is None else model_mu,
                           s if model_s is None else model_s)
  r = np.sum((_target(kind, name, x, eps, alpha, sigma) - f)**2, axis=-1)
  p = Parameterization(kind, Schedule(name, -13.3, 5.0))
  e = p.second_order_residual(jnp.full((n,), div), jnp.asarray(r), DIM,
                              jnp.full((n,), gamma))
  return np.asarray(e)


@pytest.mark.parametrize("kind,name", KINDS, ids=IDS)
def test_second_order_residual_vanishes_for_exact_model(kind, name, x64):
  for gamma in (-8.0, -2.0, 0.0, 3.0):
    e = _residuals(kind, name, gamma, 20000, seed=int(gamma) + 20)
    stderr = e.std(ddof=1) / math.sqrt(len(e))
    assert abs(e.mean()) < 4 * stderr, (gamma, e.mean(), stderr)


@pytest.mark.parametrize("kind,name", KINDS, ids=IDS)
def test_second_order_residual_detects_wrong_model(kind, name, x64):
  """The exact model of other data (wrong mean and spread) has a non-zero residual."""
  for gamma in (-2.0, 0.0, 3.0):
    e = _residuals(kind, name, gamma, 20000, seed=7, model_mu=0.0, model_s=1.2)
    stderr = e.std(ddof=1) / math.sqrt(len(e))
    assert abs(e.mean()) > 10 * stderr, (gamma, e.mean(), stderr)


@pytest.mark.parametrize("kind,name,importance",
                         [(k, s, False) for k, s in KINDS] + [("velocity", "VP", True),
                                                              ("velocity", "SP", True)])
def test_first_order_loss_of_exact_model_is_i_mmse(kind, name, importance, x64):
  """The likelihood-weighted loss of the exact model is 0.5 * integral of the noise MMSE,
  which by the I-MMSE relation is I(x; x_gmin) - I(x; x_gmax); for Gaussian data
  0.5 D [log(1 + s^2 e^-gmin) - log(1 + s^2 e^-gmax)]."""
  mu, s, n = 0.3, 0.5, 40000
  schedule = Schedule(name, -13.3, 5.0)
  p = Parameterization(kind, schedule)
  sampler = TimeSampler(schedule, importance=importance, antithetic=False)
  gamma, inv_density = sampler.sample(jax.random.PRNGKey(3), n)
  rng = np.random.default_rng(4)
  x = mu + s * rng.standard_normal((n, DIM))
  eps = rng.standard_normal((n, DIM))
  alpha, sigma = _alpha_sigma(name, np.asarray(gamma)[:, None])
  x_g = alpha * x + sigma * eps
  f, _ = _gaussian_model(kind, name, x_g, alpha, sigma, mu, s)
  # docs/design.md (Losses): weights per unit of 1 / p(gamma): eps 0.5, velocity VP 0.5 alpha^2, SP
  # alpha^2
  spec = {"eps": 0.5, "VP": 0.5 * alpha[:, 0]**2, "SP": alpha[:, 0]**2}
  weight = np.asarray(inv_density) * spec["eps" if kind == "eps" else name]
  # ... which is what the loss uses: 0.5 k^2 / p with k = eps_scale
  np.testing.assert_allclose(weight, 0.5 * np.asarray(inv_density) * np.asarray(
      p.eps_scale(gamma))**2, rtol=1e-10)
  vals = weight * np.sum((_target(kind, name, x, eps, alpha, sigma) - f)**2, axis=-1)
  exact = 0.5 * DIM * (math.log1p(s**2 * math.exp(13.3)) - math.log1p(s**2 * math.exp(-5.0)))
  stderr = vals.std(ddof=1) / math.sqrt(n)
  assert abs(vals.mean() - exact) < 4 * stderr, (vals.mean(), exact, stderr)


def _linear_net(params, x_gamma, gamma, dropout_key, train):
  """F = M x_g per example (pixels mixed, so Hutchinson is not exact) + b gamma."""
  del dropout_key, train
  flat = x_gamma.reshape(x_gamma.shape[0], -1)
  out = flat @ params["m"].T + params["b"] * gamma[:, None]
  return out.reshape(x_gamma.shape)


@pytest.mark.parametrize("name", ["VP", "SP"])
def test_second_order_loss_term_matches_independent_monte_carlo(name):
  """E of make_loss_fn's second-order term (weight * lambda * e^2 / D, one Rademacher
  probe) against an independent Monte Carlo of the loss of docs/design.md."""
  levels, lam, n = 17, 0.1, 20000
  gamma_min = default_gamma_min(levels)
  schedule = Schedule(name, gamma_min, 5.0)
  p = Parameterization("velocity", schedule)
  m = np.array([[0.5, 0.3, 0.0, -0.2], [0.3, -0.4, 0.1, 0.0],
                [0.0, 0.1, 0.2, 0.6], [-0.2, 0.0, 0.6, 0.1]])
  params = {"m": jnp.asarray(m, jnp.float32), "b": jnp.float32(0.05)}
  k_img = np.array([3, 9, 16, 0]).reshape(1, 2, 2, 1)
  batch = jnp.asarray(np.tile(k_img, (n, 1, 1, 1)))
  loss_fn = make_loss_fn(_linear_net, p, TimeSampler(schedule, antithetic=False),
                         LossConfig(num_levels=levels, second_order=True,
                                    second_order_weight=lam))
  _, terms = jax.jit(lambda key: loss_fn(params, batch, key))(jax.random.PRNGKey(0))
  got = np.asarray(terms.second_order, np.float64)

  # independent draw, the loss of docs/design.md written out in numpy
  rng = np.random.default_rng(1)
  x = ((2 * k_img.reshape(1, -1) + 1) / levels - 1).astype(np.float64)
  gamma = gamma_min + (5.0 - gamma_min) * rng.random(n)
  alpha, sigma = _alpha_sigma(name, gamma[:, None])
  eps = rng.standard_normal((n, DIM))
  x_g = alpha * x + sigma * eps
  f = x_g @ m.T + 0.05 * gamma[:, None]
  target = _target("velocity", name, x, eps, alpha, sigma)
  r = np.sum((target - f)**2, axis=-1)
  v = rng.choice([-1.0, 1.0], (n, DIM))
  div = np.einsum("ni,ij,nj->n", v, m, v)
  alpha, sigma = alpha[:, 0], sigma[:, 0]
  if name == "VP":
    e = sigma * div - alpha * (DIM - r)
    weight = 0.5 * (5.0 - gamma_min) * alpha**2
  else:
    e = sigma * div - DIM / math.sqrt(2) + math.sqrt(2) * alpha * r
    weight = (5.0 - gamma_min) * alpha**2
  expected = weight * lam * e**2 / DIM
  se = math.hypot(got.std(ddof=1), expected.std(ddof=1)) / math.sqrt(n)
  assert abs(got.mean() - expected.mean()) < 4 * se, (got.mean(), expected.mean(), se)
  # and the second-order term is absent unless asked for
  loss_fn1 = make_loss_fn(_linear_net, p, TimeSampler(schedule), LossConfig(num_levels=levels))
  _, terms1 = jax.jit(lambda key: loss_fn1(params, batch[:4], key))(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(terms1.second_order, 0.0)


@pytest.mark.parametrize("name", ["VP", "SP"])
def test_loss_of_exact_point_mass_model_is_zero(name):
  """Per example, the exact model of a one-image data set (a point mass at x) is
  eps*(x_g) = (x_g - alpha x) / sigma, whose velocity F equals F* for every eps: r = 0,
  and its divergence D alpha / sigma (VP) or D / (sqrt 2 sigma) (SP) makes the trace
  residual e exactly zero. So make_loss_fn's first- and second-order terms vanish; a
  scaled model gives non-zero terms (the divergence enters through v^T J v)."""
  levels = 17
  schedule = Schedule(name, default_gamma_min(levels), 5.0)
  p = Parameterization("velocity", schedule)
  k = jnp.asarray(np.random.default_rng(0).integers(0, levels, (64, 2, 2, 1)))
  x = bin_centre(k, levels)

  def exact_net(params, x_gamma, gamma, dropout_key, train):
    del dropout_key, train
    g = gamma.reshape(-1, 1, 1, 1)
    alpha, sigma = schedule.alpha(g), schedule.sigma(g)
    eps_star = (x_gamma - alpha * x) / sigma
    if name == "VP":
      f = alpha * eps_star - sigma * x
    else:
      f = (eps_star - x) / math.sqrt(2)
    return params * f

  loss_fn = make_loss_fn(exact_net, p, TimeSampler(schedule),
                         LossConfig(num_levels=levels, second_order=True))
  run = jax.jit(lambda params, key: loss_fn(params, k, key)[1])
  terms = run(jnp.float32(1.0), jax.random.PRNGKey(0))
  wrong = run(jnp.float32(1.1), jax.random.PRNGKey(0))
  assert np.all(np.asarray(terms.second_order) < 1e-6 * np.asarray(wrong.second_order))
  assert np.all(np.asarray(terms.diffusion) < 1e-6 * np.asarray(wrong.diffusion))


@pytest.mark.parametrize("name", ["VP", "SP"])
def test_prior_kl_against_quadrature(name, x64):
  """KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) by Gauss-Hermite quadrature of log q - log p."""
  schedule = Schedule(name, -13.3, 5.0)
  x = np.array([[-0.9, 0.1, 0.5, 1.0], [0.0, 0.0, -1.0, 0.3]])
  alpha1, sigma1 = _alpha_sigma(name, 5.0)
  nodes, weights = np.polynomial.hermite_e.hermegauss(40)
  weights = weights / weights.sum()
  z = alpha1 * x[..., None] + sigma1 * nodes  # samples of q per dimension
  log_q = -0.5 * nodes**2 - math.log(sigma1) - 0.5 * math.log(2 * math.pi)
  log_p = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
  expected = np.sum((log_q - log_p) @ weights, axis=-1)
  np.testing.assert_allclose(prior_kl(jnp.asarray(x), schedule), expected, rtol=1e-10)
  # and a noticeably wrong gamma_max changes it
  other = Schedule(name, -13.3, 2.0)
  assert not np.allclose(prior_kl(jnp.asarray(x), other), expected, rtol=1e-3)


def _expected_recon(levels, gamma_min, k):
  """E_eps[-log p(k | z0)] per pixel by Gauss-Hermite quadrature (decoder logits of
  docs/design.md)."""
  c = math.exp(gamma_min / 2)  # sigma_0 / alpha_0 in both schedules
  centres = (2 * np.arange(levels) + 1) / levels - 1
  nodes, weights = np.polynomial.hermite_e.hermegauss(120)
  weights = weights / weights.sum()
  scaled = centres[k][..., None] + c * nodes  # z0 / alpha0
  logits = -0.5 * ((scaled[..., None] - centres) / c)**2
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  own = np.take_along_axis(logits, np.broadcast_to(k[..., None, None], logits.shape[:-1] + (1,)),
                           -1)[..., 0]
  return ((lse - own) @ weights)


@pytest.mark.parametrize("name", ["VP", "SP"])
def test_reconstruction_loss_matches_quadrature_and_is_small(name):
  levels, n = 17, 20000
  gamma_min = default_gamma_min(levels)
  schedule = Schedule(name, gamma_min, 5.0)
  k_img = np.array([0, 5, 8, 16])
  k = jnp.asarray(np.tile(k_img.reshape(1, 2, 2, 1), (n, 1, 1, 1)))
  rec = np.asarray(jax.jit(lambda key: reconstruction_loss(
      key, k, bin_centre(k, levels), schedule, levels))(jax.random.PRNGKey(0)), np.float64)
  expected = _expected_recon(levels, gamma_min, k_img).sum()
  stderr = rec.std(ddof=1) / math.sqrt(n)
  assert abs(rec.mean() - expected) < 4 * stderr + 1e-4, (rec.mean(), expected, stderr)
  # tau = 3: only the 0.27% tails of the noise leave the bin, so a few hundredths of a nat
  assert rec.mean() / 4 < 0.02
  # each draw is -log of a probability: >= 0 up to the float32 rounding of logits whose
  # inputs are about 1 / exp(gamma_min / 2) = 51 in size (measured min -1.2e-5)
  assert rec.min() > -1e-4


def test_loss_terms_shapes_and_sde_sum():
  levels = 17
  schedule = Schedule("VP", default_gamma_min(levels), 5.0)
  p = Parameterization("velocity", schedule)
  params = {"m": jnp.eye(DIM, dtype=jnp.float32), "b": jnp.float32(0.0)}
  loss_fn = make_loss_fn(_linear_net, p, TimeSampler(schedule), LossConfig(num_levels=levels))
  k = jnp.asarray(np.arange(8 * DIM).reshape(8, 2, 2, 1) % levels)
  bpd, terms = jax.jit(lambda key: loss_fn(params, k, key))(jax.random.PRNGKey(0))
  for t in (terms.diffusion, terms.second_order, terms.prior, terms.recon):
    assert t.shape == (8,)
  np.testing.assert_allclose(terms.sde_nats(), terms.recon + terms.prior + terms.diffusion)
  np.testing.assert_allclose(bpd, np.mean(terms.diffusion) / (DIM * math.log(2)), rtol=1e-5)
  np.testing.assert_allclose(terms.prior, prior_kl(bin_centre(k, levels), schedule), rtol=1e-5)
