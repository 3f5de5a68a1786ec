"""Matmul precision (diffode_jax/precision.py): eval.precision reaches the compiled solve
and the sampler, training.precision the train step; bad values are one-line errors.

Only lowering is needed (abstract params), so nothing here trains or solves.
"""

import jax
import jax.numpy as jnp
import pytest

import tiny
from diffode_jax import precision
from diffode_jax.config import ConfigError, eval_settings, finalize_config, sample_settings
from diffode_jax.likelihood import make_log_prob_fn
from diffode_jax.model import build
from diffode_jax.sampling import make_sample_fn
from diffode_jax.train_state import create_train_state, make_optimizer, make_train_step


def _products(text: str) -> list[str]:
  """The StableHLO lines of every convolution and matrix product."""
  return [l for l in text.splitlines()
          if "stablehlo.convolution" in l or "stablehlo.dot_general" in l]


@pytest.fixture(scope="module")
def built():
  config = finalize_config(tiny.config(tiny.FIXTURE))
  components = build(config)
  params = jax.eval_shape(components.init_params, jax.random.PRNGKey(0))
  return config, components, params


def test_eval_precision_reaches_the_solve_and_the_sampler(built):
  config, c, params = built
  k = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.uint8)
  key = jax.random.PRNGKey(0)
  counts = {}
  for value in ("highest", "default"):
    log_prob = make_log_prob_fn(c.drift, c.schedule, c.num_levels,
                                eval_settings(config, precision=value))
    lines = _products(log_prob.solve.lower(params, k, key, None).as_text())
    counts[value] = (len(lines), sum("HIGHEST" in l for l in lines))
  total, highest = counts["highest"]
  assert total > 20 and highest == total  # every product of the drift and the divergence
  assert counts["default"][1] < total / 4  # only diffrax's own (explicitly HIGHEST) ones
  assert config.eval.precision == "highest" == eval_settings(config).precision

  settings = sample_settings(config)
  assert settings.precision == "highest"
  sample = make_sample_fn(c.drift, c.schedule, c.num_levels, (4, 8, 8, 1), settings)
  lines = _products(sample.solve.lower(params, key).as_text())
  assert lines and all("HIGHEST" in l for l in lines)


def test_training_precision_reaches_the_train_step(built):
  config, c, params = built
  assert config.training.precision == "default"
  optimizer = make_optimizer(config.training)
  state = jax.eval_shape(lambda p: create_train_state(p, optimizer), params)
  batch = jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.uint8)
  step = make_train_step(c.loss_fn, optimizer, 0.999, c.dim)
  for value, want in (("highest", True), ("default", False)):
    text = jax.jit(precision.traced_with(value, step)).lower(
        state, batch, jax.random.PRNGKey(0)).as_text()
    convolutions = [l for l in _products(text) if "convolution" in l]
    assert convolutions and all(("HIGHEST" in l) == want for l in convolutions), value


@pytest.mark.parametrize("section, field, value", [
    ("eval", "precision", "fp32"), ("training", "precision", "tf32"),
    ("eval", "exact_trace_chunk", 0)])
def test_bad_values_are_config_errors(section, field, value):
  config = tiny.config(tiny.FIXTURE)
  config[section][field] = value
  with pytest.raises(ConfigError, match=f"{section}.{field}"):
    finalize_config(config)
