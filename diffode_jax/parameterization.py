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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from diffode_jax.schedules import Schedule, expand_like

_SQRT2 = math.sqrt(2.0)
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Form:
  """One row of the table above: the formulas of one (parameterization, schedule) pair, as
  functions of alpha and sigma at gamma.

  ``target(alpha, sigma, x, eps)`` is F*; ``eps_hat(alpha, sigma, f, x_gamma)`` the noise
  implied by the output f; ``drift_scale(alpha, sigma)`` the c of drift = c * F, or None
  when the drift is not a multiple of F: it is then the schedule's drift of the implied
  noise, a x + b eps_hat (``Schedule.drift_coefficients``);
  ``eps_scale(alpha, gamma)`` the k of eps - eps_hat = k * (F* - F);
  ``residual(alpha, sigma, divergence, sq_error, dim)`` the second-order trace residual.
  """
  target: Callable[[Array, Array, Array, Array], Array]
  eps_hat: Callable[[Array, Array, Array, Array], Array]
  drift_scale: Callable[[Array, Array], Array] | None
  eps_scale: Callable[[Array, Array], Array]
  residual: Callable[[Array, Array, Array, Array, int], Array]


# The eps baseline does not depend on the schedule's form: its rows are one Form.
_EPS = Form(
    target=lambda alpha, sigma, x, eps: eps,
    eps_hat=lambda alpha, sigma, f, x_gamma: f,
    drift_scale=None,
    eps_scale=lambda alpha, gamma: jnp.ones_like(jnp.asarray(gamma, dtype=float)),
    residual=lambda alpha, sigma, div, sq, dim: sigma * div - dim + sq)

FORMS: dict[tuple[str, str], Form] = {
    ("eps", "VP"): _EPS,
    ("eps", "SP"): _EPS,
    ("velocity", "VP"): Form(
        target=lambda alpha, sigma, x, eps: alpha * eps - sigma * x,
        eps_hat=lambda alpha, sigma, f, x_gamma: alpha * f + sigma * x_gamma,
        drift_scale=lambda alpha, sigma: 0.5 * sigma * alpha,
        eps_scale=lambda alpha, gamma: alpha,
        residual=lambda alpha, sigma, div, sq, dim: sigma * div - alpha * (dim - sq)),
    ("velocity", "SP"): Form(
        target=lambda alpha, sigma, x, eps: (eps - x) / _SQRT2,
        eps_hat=lambda alpha, sigma, f, x_gamma: _SQRT2 * alpha * f + x_gamma,
        drift_scale=lambda alpha, sigma: sigma * alpha / _SQRT2,
        eps_scale=lambda alpha, gamma: _SQRT2 * alpha,
        residual=lambda alpha, sigma, div, sq, dim: (sigma * div - dim / _SQRT2
                                                     + _SQRT2 * alpha * sq)),
}
PARAMETERIZATIONS = tuple(dict.fromkeys(kind for kind, _ in FORMS))


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Conversions between the network output and the diffusion quantities (``FORMS``)."""

  kind: str
  schedule: Schedule

  def __post_init__(self) -> None:
    if (self.kind, self.schedule.name) not in FORMS:
      raise ValueError(
          f"unknown parameterization {self.kind!r} for schedule {self.schedule.name!r}; "
          f"expected one of {PARAMETERIZATIONS}")

  @property
  def form(self) -> Form:
    return FORMS[(self.kind, self.schedule.name)]

  def _coeffs(self, gamma: Array, like: Array) -> tuple[Array, Array]:
    c = self.schedule.coefficients(expand_like(gamma, like))
    return c.alpha, c.sigma

  def target(self, x: Array, eps: Array, gamma: Array) -> Array:
    """Regression target F* for data x and noise eps at gamma."""
    return self.form.target(*self._coeffs(gamma, x), x, eps)

  def eps_hat(self, f: Array, x_gamma: Array, gamma: Array) -> Array:
    """Noise prediction implied by the network output f at state x_gamma."""
    return self.form.eps_hat(*self._coeffs(gamma, x_gamma), f, x_gamma)

  def drift(self, f: Array, x_gamma: Array, gamma: Array) -> Array:
    """Probability-flow ODE drift dx/dgamma given the network output f."""
    if self.form.drift_scale is None:
      a, b = self.schedule.drift_coefficients(expand_like(gamma, x_gamma))
      return a * x_gamma + b * self.eps_hat(f, x_gamma, gamma)
    return self.drift_scale(gamma, x_gamma) * f

  def drift_scale(self, gamma: Array, like: Array | None = None) -> Array:
    """c(gamma) with drift = c * F (velocity only); the derivative of drift w.r.t. F."""
    if self.form.drift_scale is None:
      raise ValueError(f"the {self.kind} drift is not a multiple of the network output")
    c = self.schedule.coefficients(gamma if like is None else expand_like(gamma, like))
    return self.form.drift_scale(c.alpha, c.sigma)

  def eps_scale(self, gamma: Array) -> Array:
    """k(gamma) with eps - eps_hat = k * (F* - F)."""
    return self.form.eps_scale(self.schedule.alpha(gamma), gamma)

  def second_order_residual(self, divergence: Array, sq_error: Array, dim: int,
                            gamma: Array) -> Array:
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
    return self.form.residual(c.alpha, c.sigma, divergence, sq_error, dim)


def make_parameterization(config_model: ml_collections.ConfigDict,
                          schedule: Schedule) -> Parameterization:
  return Parameterization(config_model.parameterization, schedule)
