"""The sampling ODE: reversibility, decoding to integers, the picture grid, settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax import data, ode
from diffode_jax.discretization import bin_centre
from diffode_jax.config import finalize_config
from diffode_jax.errors import ConfigError
from diffode_jax.model import build
from diffode_jax.sampling import flow, image_grid, to_integers


def _perturbed(components, scale):
  """Init params plus Gaussian noise: the zero-initialized output layer makes a fresh drift
  trivial (docs/design.md, Numerical facts), a small perturbation gives a smooth non-trivial one.
  The noise is
  numpy's, so no random-number kernel has to compile for each parameter shape."""
  rng = np.random.default_rng(1)
  params = components.init_params(jax.random.PRNGKey(0))
  return jax.tree.map(
      lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32),
      params)


def test_encode_then_decode_returns_the_image(tiny_config):
  """gamma_min -> gamma_max -> gamma_min recovers z_0 to the solver's accuracy, so the
  decoder returns the very integers (the flow is a bijection)."""
  config = finalize_config(tiny_config)
  components = build(config)
  params = _perturbed(components, 0.03)
  schedule = components.schedule
  images = data.load_split(config.data, "test").images[:4]
  z0 = schedule.alpha(schedule.gamma_min) * bin_centre(images, config.data.num_levels)
  solver = ode.SolverConfig(solver="tsit5", rtol=1e-5, atol=1e-5)

  solve = jax.jit(lambda p, x, start, end: flow(components.drift, p, x, start, end, solver))
  x1, _, ok_up = solve(params, z0, schedule.gamma_min, schedule.gamma_max)
  back, _, ok_down = solve(params, x1, schedule.gamma_max, schedule.gamma_min)
  ok = ok_up & ok_down
  assert bool(ok)
  assert float(jnp.abs(x1 - z0).max()) > 1.0  # the flow really moved the state
  # Measured 3.5e-3 at tolerance 1e-5 (7e-4 at 1e-6); a bin is 2 / 17 = 0.12 wide.
  assert float(jnp.abs(back - z0).max()) < 1e-2
  for decode in ("argmax", "round"):
    decoded = to_integers(back, None, schedule, config.data.num_levels, decode)
    np.testing.assert_array_equal(np.asarray(decoded), images)


@pytest.mark.parametrize("num_levels", [17, 256])
def test_bin_centres_decode_to_their_levels(tiny_config, num_levels):
  tiny_config.data.num_levels = num_levels
  config = finalize_config(tiny_config)
  schedule = build(config).schedule
  k = jnp.arange(num_levels).reshape(1, -1, 1, 1)
  z0 = schedule.alpha(schedule.gamma_min) * bin_centre(k, num_levels)
  for decode in ("argmax", "round"):
    np.testing.assert_array_equal(to_integers(z0, None, schedule, num_levels, decode), k)
  drawn = to_integers(z0, jax.random.PRNGKey(0), schedule, num_levels, "sample")
  # Each draw misses its bin with probability 1 - erf(3 / sqrt 2) = 0.27% (tau = 3).
  assert float(jnp.mean(drawn == k)) > 0.9
  assert drawn.dtype == jnp.uint8


def test_image_grid_layout_and_scaling():
  images = np.zeros((3, 8, 8, 1), np.uint8)
  images[1] = 16
  grid = image_grid(images, num_levels=17, min_size=64, border=1)
  assert grid.dtype == np.uint8
  assert grid.shape == (2 * 65 + 1, 2 * 65 + 1, 1)  # 2 x 2 cells of 64 px, 1 px gaps
  assert grid[1:65, 1:65].max() == 0  # image 0, level 0 -> black
  assert grid[1:65, 66:130].min() == 255  # image 1, level 16 of 17 -> white
  assert grid[0].min() == 255  # border


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_image_grid_saves_as_png_for_any_channel_count(channels, tmp_path):
  from PIL import Image

  images = np.arange(2 * 4 * 4 * channels).reshape(2, 4, 4, channels) % 7
  grid = image_grid(images, num_levels=7, min_size=4, border=0)
  side_by_side = channels not in (1, 3, 4)
  assert grid.shape == (4, 8 * (channels if side_by_side else 1),
                        1 if side_by_side else channels)
  if side_by_side:  # image 0, channel c is the c-th 4-pixel-wide block of the first cell
    for c in range(channels):
      np.testing.assert_array_equal(grid[:, 4 * c:4 * c + 4, 0],
                                    np.round(images[0, ..., c] * 255 / 6))
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp_path / "g.png")


@pytest.mark.parametrize("field,value,message", [
    ("decode", "nearest", "sample.decode"),
    ("solver", "scipy_rk45", "on device"),
])
def test_bad_sample_settings_are_config_errors(tiny_config, field, value, message):
  setattr(tiny_config.sample, field, value)
  with pytest.raises(ConfigError, match=message):
    finalize_config(tiny_config)
