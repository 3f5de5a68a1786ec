"""Every config field's valid range (diffode_jax/config_fields.py), its documentation, and
the evaluation settings that would make a number that is not a bound of the model."""

from __future__ import annotations

import glob
import importlib
import math
import os
import sys

import ml_collections
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default, digits  # noqa: E402
from diffode_jax import config_fields  # noqa: E402
from diffode_jax.config import eval_settings, finalize_config  # noqa: E402
from diffode_jax.errors import ConfigError  # noqa: E402


def leaves(config, prefix=""):
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}"


def shipped_configs():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if not name.startswith("_"):
      yield name, importlib.import_module(f"configs.{name}").get_config()


def test_every_field_of_every_config_has_a_rule():
  missing = {f"{name}: {field}" for name, config in shipped_configs()
             for field in leaves(config) if field not in config_fields.FIELDS}
  assert not missing
  stale = set(config_fields.FIELDS) - set(leaves(default.get_config()))
  assert not stale, f"rules for fields configs/default.py does not have: {stale}"


@pytest.mark.parametrize("name", [n for n, _ in shipped_configs()])
def test_every_shipped_config_passes_its_table(name):
  config = dict(shipped_configs())[name]
  config_fields.check_fields(config)
  finalize_config(config)


def test_the_documentation_is_the_table():
  with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
    text = f.read()
  assert config_fields.markdown_table() in text


# Values just outside and just inside each kind of rule, with the one line it gives.
OUTSIDE = [
    ("model.dropout", 1.5, "model.dropout must be a number in [0, 1), got 1.5"),
    ("model.dropout", 1.0, "model.dropout must be a number in [0, 1)"),
    ("model.dropout", -0.1, "model.dropout must be a number in [0, 1)"),
    ("training.b1", 1.0, "training.b1 must be a number in [0, 1)"),
    ("training.b2", 1.5, "training.b2 must be a number in [0, 1)"),
    ("training.eps", -1.0, "training.eps must be a number > 0"),
    ("training.eps", 0.0, "training.eps must be a number > 0"),
    ("training.weight_decay", -5.0, "training.weight_decay must be a number >= 0"),
    ("training.grad_clip", -1.0, "training.grad_clip must be 0 (off) or a number > 0"),
    ("training.learning_rate", 0.0, "training.learning_rate must be a number > 0"),
    ("training.learning_rate", float("nan"), "training.learning_rate must be a number > 0"),
    ("training.ema_decay", 1.01, "training.ema_decay must be a number in [0, 1]"),
    ("training.divergence_factor", 0.5, "training.divergence_factor must be 0 (off) or a "
     "number > 1"),
    ("training.warmup_steps", -1, "training.warmup_steps must be an integer >= 0"),
    ("training.batch_size", 2.5, "training.batch_size must be an integer >= 1"),
    ("training.batch_size", True, "training.batch_size must be an integer >= 1"),
    ("training.eval_every", -3, "training.eval_every must be 0 (off) or an integer >= 1"),
    ("model.second_order_weight", -0.1, "model.second_order_weight must be a number >= 0"),
    ("model.remat", 1, "model.remat must be True or False, got 1"),
    ("model.schedule", "cosine", "unknown model.schedule 'cosine'; expected one of"),
    ("model.gamma_max", float("inf"), "model.gamma_max must be a finite number"),
    ("data.holdout_fraction", 1.0, "data.holdout_fraction must be a number in [0, 1)"),
    ("data.tfds_train_split", "", "data.tfds_train_split must be a non-empty string"),
    ("data.num_levels", 1, "data.num_levels must be an integer >= 2"),
    ("eval.rtol", 0.5, "eval.rtol must be a number in (0, 0.1]"),
    ("eval.num_importance", 0, "eval.num_importance must be an integer in [1, 1048575]"),
    # K sample keys stay below the sde_bpd key (keys.py)
    ("eval.num_importance", 1 << 20, "eval.num_importance must be an integer in [1, 1048575]"),
    ("eval.exact_trace_chunk", 0, "eval.exact_trace_chunk must be an integer >= 1, or None"),
    ("sample.solver", "scipy_rk45", "unknown sample.solver 'scipy_rk45'"),
    ("seed", -1, "seed must be an integer >= 0"),
]
INSIDE = [("model.dropout", 0.0), ("model.dropout", 0.99), ("training.grad_clip", 0.0),
          ("training.divergence_factor", 0.0), ("training.divergence_factor", 1.5),
          ("training.eval_every", 0), ("training.ema_decay", 1.0), ("eval.rtol", 0.1),
          ("eval.num_images", None), ("training.learning_rate", 1)]


def _with(field, value):
  """configs/digits.py with field set to value (without ml_collections' type casts, as a
  config built in Python may be)."""
  tree = digits.get_config().to_dict()
  *path, leaf = field.split(".")
  node = tree
  for p in path:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("field, value, message", OUTSIDE)
def test_a_value_outside_its_range_is_one_line(field, value, message):
  with pytest.raises(ConfigError) as err:
    finalize_config(_with(field, value))
  assert message in str(err.value)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", INSIDE)
def test_a_value_inside_its_range_passes(field, value):
  finalize_config(_with(field, value))


def test_every_rule_rejects_what_it_describes_as_outside():
  """Each numeric rule against its own bounds: the edges it excludes fail, a point inside
  passes (the description and the check cannot drift apart)."""
  for field, rule in config_fields.FIELDS.items():
    if not isinstance(rule, config_fields.Number):
      continue
    assert not rule.ok(True) and not rule.ok("1") and not rule.ok(math.inf), field
    assert rule.ok(None) == bool(rule.optional), field
    if rule.low is not None:
      assert rule.ok(rule.low) != rule.low_open or (rule.zero and rule.low == 0), field
      below = rule.low - 1
      assert not rule.ok(below) or (rule.zero and below == 0), field
    if rule.high is not None:
      assert rule.ok(rule.high) != rule.high_open, field
      assert not rule.ok(rule.high + 1), field
    if rule.integer:
      inside = (rule.low or 0) + 1
      assert rule.ok(inside) and not rule.ok(inside + 0.5), field


def test_gamma_min_below_gamma_max():
  with pytest.raises(ConfigError, match=r"model.gamma_min \(6\) must be below"):
    finalize_config(_with("model.gamma_min", 6.0))


@pytest.mark.parametrize("gamma_u, ok", [(6.0, False), (5.0, False), (-20.0, False),
                                         (4.9, True), (-7.0, True)])
def test_u_starts_inside_the_schedule(gamma_u, ok):
  """A u bound started at gamma_u >= gamma_max (or below gamma_min) integrates another
  model than this one: refused in the config and in the API's overrides."""
  config = _with("eval.dequantization", "u")
  config.eval.gamma_u = gamma_u
  if ok:
    finalize_config(config)
    eval_settings(finalize_config(digits.get_config()), dequantization="u", gamma_u=gamma_u)
    return
  with pytest.raises(ConfigError, match="eval.gamma_u=.* must lie in the model's range"):
    finalize_config(config)
  with pytest.raises(ConfigError, match="must lie in the model's range"):
    eval_settings(finalize_config(digits.get_config()), dequantization="u", gamma_u=gamma_u)


@pytest.mark.parametrize("override, message", [
    ({"num_importance": 0}, "eval.num_importance must be an integer in [1, 1048575]"),
    ({"num_importance": 2.5}, "eval.num_importance must be an integer in [1, 1048575]"),
    ({"rtol": -1.0}, "eval.rtol must be a number in (0, 0.1]"),
    ({"max_steps": 0}, "eval.max_steps must be an integer >= 1"),
    ({"dequantization": "gauss"}, "unknown eval.dequantization 'gauss'"),
    ({"divergence": "hutch"}, "unknown eval.divergence 'hutch'"),
])
def test_api_overrides_are_checked_by_the_same_table(override, message):
  with pytest.raises(ConfigError) as err:
    eval_settings(finalize_config(digits.get_config()), **override)
  assert message in str(err.value)


def test_a_zero_meaning_off_admits_no_negative_neighbour():
  rule = config_fields.FIELDS["training.grad_clip"]
  assert rule.ok(0) and rule.ok(0.0) and rule.ok(1e-9) and not rule.ok(-1e-9)


@pytest.mark.parametrize("name", [n for n, _ in shipped_configs()])
def test_the_solver_sections_map_to_solver_configs_and_back(name):
  """config.eval and config.sample hold exactly ode.SolverConfig.SECTION_FIELDS of the
  solver, each with a rule, and from_section / section_fields are inverses on them."""
  from diffode_jax import ode
  config = dict(shipped_configs())[name]
  for section in ("eval", "sample"):
    values = {f: config[section][f] for f in ode.SolverConfig.SECTION_FIELDS}
    assert all(f"{section}.{f}" in config_fields.FIELDS for f in values)
    assert ode.SolverConfig.from_section(config[section]).section_fields() == values
  solver = ode.SolverConfig.from_section(config.eval, rtol=3e-4)
  assert (solver.rtol, solver.atol) == (3e-4, config.eval.atol)
