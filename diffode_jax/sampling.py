"""Sampling by the probability-flow ODE, and its inverse (docs/design.md, Sampling).

Sampling draws x_1 ~ N(0, sigma_max^2 I) at gamma_max, solves dx/dgamma = drift(x, gamma)
backwards to gamma_min on device (diffrax, no divergence), and maps the state
z_0 = alpha_0 x + sigma_0 eps to integers:

* ``argmax``: the most likely level under the VDM decoder p(k | z_0) (``decoder.py``);
* ``sample``: a draw from that decoder;
* ``round``: the nearest bin of z_0 / alpha_0 (``discretization.to_levels``).

Each returns integers of the data's type, ``data.level_dtype(V)`` (uint8 for V <= 256).

``flow`` is the same ODE between any two times; encoding an image to gamma_max and
flowing back recovers it up to the solver tolerance (the flow is a bijection).

With a mesh of several devices each batch is one system split over the devices, as in
``likelihood.py``: x_1 is drawn inside the jitted function for the batch's global shape
(so every device draws different rows, and the images are those of one device up to the
solver's accuracy) and the integers come back on every process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax.sharding import Mesh

from diffode_jax import ode, parallel
from diffode_jax import precision as precision_lib
from diffode_jax.decoder import decode_argmax, decode_sample
from diffode_jax.discretization import to_levels
from diffode_jax.ode import ParamsDriftFn, PyTree
from diffode_jax.schedules import FloatLike, Schedule
from diffode_jax.errors import SamplingError  # noqa: F401  (re-exported)

DECODES = ("argmax", "sample", "round")
DEFAULT_DECODE = "argmax"  # the library's and configs/default.py's sample default

if TYPE_CHECKING:
  import ml_collections


@dataclasses.dataclass(frozen=True)
class SampleFn:
  """What ``make_sample_fn`` returns: sample(params, key) -> (integers, nfe, success), a
  jitted function (``solve``) and the mesh it splits batches over (None: one device)."""

  solve: Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
  mesh: Mesh | None = None

  def __call__(self, params: PyTree, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.solve(params, key)


# The sampling default: dopri5 at 1e-5 (bosh3 at 1e-4 ends nearer the float64 reverse solve
# on the digits at 0.57 x the NFE; not measured on 8-bit data, docs/evaluation.md).
DEFAULT_SAMPLE_SOLVER = ode.SolverConfig()


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How ``make_sample_fn`` samples; the defaults are configs/default.py's."""

  decode: str = DEFAULT_DECODE
  solver: ode.SolverConfig = DEFAULT_SAMPLE_SOLVER
  precision: str = precision_lib.DEFAULT_EVAL_PRECISION  # matmul precision (precision.py)

  def __post_init__(self) -> None:
    if self.decode not in DECODES:
      raise ValueError(f"unknown sample.decode {self.decode!r}; expected one of {DECODES}")
    ode.check_on_device(self.solver, "sampling (sample.solver)")
    precision_lib.check(self.precision, "eval.precision")


def sample_settings(config: ml_collections.ConfigDict) -> SampleSettings:
  """SampleSettings from config.sample, with config.eval.precision (ValueError on a bad
  choice)."""
  s = config.sample
  return SampleSettings(s.decode, ode.SolverConfig.from_section(s), config.eval.precision)


def flow(drift: ParamsDriftFn, params: PyTree, x: jax.Array, gamma_from: FloatLike,
         gamma_to: FloatLike, solver: ode.SolverConfig
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Solves dx/dgamma = drift(params, x, gamma) from gamma_from to gamma_to (either way).

  Returns (x at gamma_to, nfe, success) as arrays; jit-compatible.
  """
  field = lambda gamma, y, args: drift(params, y, gamma)
  return ode.solve_diffrax(field, x, gamma_from, gamma_to, solver)


def to_integers(z0: jax.Array, key: jax.Array, schedule: Schedule, num_levels: int,
                decode: str) -> jax.Array:
  """Integer images from states z_0 at gamma_min (see the module docstring)."""
  if decode == "argmax":
    return decode_argmax(z0, schedule, num_levels)
  if decode == "sample":
    return decode_sample(key, z0, schedule, num_levels)
  if decode == "round":
    alpha0 = schedule.alpha(jnp.asarray(schedule.gamma_min, z0.dtype))
    return to_levels(z0 / alpha0, num_levels)
  raise ValueError(f"unknown decode {decode!r}; expected one of {DECODES}")


def make_sample_fn(drift: ParamsDriftFn, schedule: Schedule, num_levels: int,
                   shape: tuple[int, ...], settings: SampleSettings,
                   mesh: Mesh | None = None) -> SampleFn:
  """sample(params, key) -> (integers of shape ``shape`` (B, H, W, C), nfe, success), jitted.

  With a ``mesh`` of several devices, B must be a multiple of its device count and params
  replicated over it (``draw`` does that); the outputs are replicated on every device.
  """
  sharded = mesh if mesh is not None and mesh.size > 1 else None  # None: one device
  rows = parallel.batch_sharding(sharded) if sharded is not None else None

  def sample(params: PyTree, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    k_noise, k_decode = jax.random.split(key)
    sigma_max = schedule.sigma(jnp.asarray(schedule.gamma_max, jnp.float32))
    x1 = sigma_max * jax.random.normal(k_noise, shape, jnp.float32)
    if rows is not None:
      x1 = jax.lax.with_sharding_constraint(x1, rows)
    z0, nfe, ok = flow(drift, params, x1, schedule.gamma_max, schedule.gamma_min,
                       ode.scaled_tolerances(settings.solver, schedule.gamma_min))
    ok = ok & jnp.all(jnp.isfinite(z0))
    return to_integers(z0, k_decode, schedule, num_levels, settings.decode), nfe, ok

  jitted = jax.jit(
      precision_lib.traced_with(settings.precision, sample),
      out_shardings=parallel.replicated_sharding(sharded) if sharded is not None else None)
  return SampleFn(jitted, sharded)


def draw(sample_fn: SampleFn, params: PyTree, key: jax.Array, num: int, batch_size: int
         ) -> tuple[np.ndarray, list[int]]:
  """num integer images from whole batches of sample_fn (batch b uses fold_in(key, b)).

  Returns (images (num, H, W, C), NFE per batch). Raises SamplingError on a failed solve.
  A sample_fn over a mesh of several devices gets params replicated over it once.
  """
  mesh = sample_fn.mesh
  if mesh is not None:
    params = parallel.replicate(parallel.local_copy(params),
                                parallel.replicated_sharding(mesh))
  images, nfes = [], []
  for b in range(-(-num // batch_size)):
    batch, nfe, ok = sample_fn(params, jax.random.fold_in(key, b))
    if not bool(parallel.local_copy(ok)):
      raise SamplingError("the sampling ODE did not reach gamma_min within sample.max_steps "
                          "(or went non-finite); raise sample.max_steps or loosen "
                          "sample.rtol / sample.atol")
    images.append(parallel.local_copy(batch))
    nfes.append(int(parallel.local_copy(nfe)))
  return np.concatenate(images)[:num], nfes


def image_grid(images: npt.ArrayLike, num_levels: int, min_size: int = 64, border: int = 1
               ) -> np.ndarray:
  """A uint8 picture (rows, cols, C) of integer images, levels scaled to 0..255.

  Images with 1, 3 or 4 channels keep them (grey, RGB, RGBA); others are shown as grey
  pictures of their channels side by side (C = 1).

  Images are placed on a near-square grid with a ``border``-pixel gap and each is
  enlarged by an integer factor (nearest neighbour) to at least ``min_size`` pixels.
  """
  images = np.asarray(images).astype(np.float64)
  if images.shape[-1] not in (1, 3, 4):  # no PNG mode for them: channels side by side, grey
    n, height, width, channels = images.shape
    images = images.transpose(0, 1, 3, 2).reshape(n, height, channels * width, 1)
  n, height, width, channels = images.shape
  scale = max(1, math.ceil(min_size / max(height, width)))
  pixels = np.round(images * 255.0 / (num_levels - 1)).astype(np.uint8)
  pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  h, w = height * scale, width * scale
  grid = np.full((rows * (h + border) + border, cols * (w + border) + border, channels), 255,
                 np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    top, left = border + r * (h + border), border + c * (w + border)
    grid[top:top + h, left:left + w] = pixels[i]
  return grid
