"""What the network output F(x_gamma, gamma) means (docs/design.md, Parameterizations).

Two parameterizations share one interface:

* ``eps`` (the baseline): F predicts the noise, target eps.
* ``velocity`` (i-DODE): F predicts a scaled time derivative of the forward path, so the
  probability-flow drift is F times a scalar.

  ============  ======================  ======================  ===========================
  schedule      target F*               eps_hat from F          drift dx/dgamma
  ============  ======================  ======================  ===========================
  VP            alpha eps - sigma x     alpha F + sigma x_g     sigma alpha / 2 * F
  SP            (eps - x) / sqrt(2)     sqrt(2) alpha F + x_g   sigma alpha / sqrt(2) * F
  ============  ======================  ======================  ===========================

For every pair, eps - eps_hat = ``eps_scale(gamma)`` * (F* - F), which is what turns the
likelihood-weighted noise loss into a weighted regression on F (docs/design.md, Losses).

Per-example gamma has shape (B,) and broadcasts against images of shape (B, H, W, C);
a scalar gamma broadcasts against everything.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from diffode_jax.schedules import Schedule, expand_like

PARAMETERIZATIONS = ("eps", "velocity")
_SQRT2 = math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Conversions between the network output and the diffusion quantities."""

  kind: str
  schedule: Schedule

  def __post_init__(self):
    if self.kind not in PARAMETERIZATIONS:
      raise ValueError(
          f"unknown parameterization {self.kind!r}; expected one of {PARAMETERIZATIONS}")

  @property
  def is_velocity(self) -> bool:
    return self.kind == "velocity"

  def _coeffs(self, gamma, like):
    c = self.schedule.coefficients(expand_like(gamma, like))
    return c.alpha, c.sigma

  def target(self, x, eps, gamma):
    """Regression target F* for data x and noise eps at gamma."""
    if self.kind == "eps":
      return eps
    alpha, sigma = self._coeffs(gamma, x)
    if self.schedule.name == "VP":
      return alpha * eps - sigma * x
    return (eps - x) / _SQRT2

  def eps_hat(self, f, x_gamma, gamma):
    """Noise prediction implied by the network output f at state x_gamma."""
    if self.kind == "eps":
      return f
    alpha, sigma = self._coeffs(gamma, x_gamma)
    if self.schedule.name == "VP":
      return alpha * f + sigma * x_gamma
    return _SQRT2 * alpha * f + x_gamma

  def drift(self, f, x_gamma, gamma):
    """Probability-flow ODE drift dx/dgamma given the network output f."""
    if self.kind == "eps":
      g = expand_like(gamma, x_gamma)
      a, b = self.schedule.drift_coefficients(g)
      return a * x_gamma + b * f
    return self.drift_scale(gamma, x_gamma) * f

  def drift_scale(self, gamma, like=None):
    """c(gamma) with drift = c * F (velocity only); the derivative of drift w.r.t. F."""
    if self.kind == "eps":
      raise ValueError("the eps drift is not a multiple of the network output")
    c = self.schedule.coefficients(gamma if like is None else expand_like(gamma, like))
    alpha, sigma = c.alpha, c.sigma
    if self.schedule.name == "VP":
      return 0.5 * sigma * alpha
    return sigma * alpha / _SQRT2

  def eps_scale(self, gamma):
    """k(gamma) with eps - eps_hat = k * (F* - F)."""
    if self.kind == "eps":
      return jnp.ones_like(jnp.asarray(gamma, dtype=float))
    alpha = self.schedule.alpha(gamma)
    if self.schedule.name == "VP":
      return alpha
    return _SQRT2 * alpha

  def second_order_residual(self, divergence, sq_error, dim, gamma):
    """The trace residual e of second-order flow matching (docs/design.md, Second order).

    Args:
      divergence: tr(dF/dx_gamma) per example (an unbiased estimate is enough).
      sq_error: r = ||F* - F||^2 per example (hold it constant when training).
      dim: D, the number of dimensions of one example.
      gamma: per-example gamma.

    Returns e, which is zero in expectation over eps given x_gamma when F is the exact
    minimizer (second-order Tweedie: sigma tr(d eps*/dx) = D - E||eps - eps*||^2).
    The eps case uses that identity directly: e = sigma div - D + r.
    """
    c = self.schedule.coefficients(gamma)
    sigma, alpha = c.sigma, c.alpha
    if self.kind == "eps":
      return sigma * divergence - dim + sq_error
    if self.schedule.name == "VP":
      return sigma * divergence - alpha * (dim - sq_error)
    return sigma * divergence - dim / _SQRT2 + _SQRT2 * alpha * sq_error


def make_parameterization(config_model, schedule: Schedule) -> Parameterization:
  return Parameterization(config_model.parameterization, schedule)
