"""Config finalization and validation: the one place that turns a ConfigDict into a run's.

``finalize_config`` fills the derived fields (gamma_min and gamma_u from the bit depth,
the Fourier frequencies) and checks every choice, raising ``ConfigError`` with one line;
``eval_settings`` / ``sample_settings`` turn config.eval / config.sample into the typed
settings the library takes. ``read_workdir_config`` reads a workdir's config.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any

import ml_collections

from diffode_jax import ode, paths, precision, storage
from diffode_jax.config_fields import ARCHS, FIELDS, check_fields, check_value
from diffode_jax.data import check_data_config
from diffode_jax.errors import CheckpointError, ConfigError, described
from diffode_jax.likelihood import EvalSettings
from diffode_jax.networks import check_network_config
from diffode_jax.parameterization import make_parameterization
from diffode_jax.sampling import SampleSettings, sample_settings
from diffode_jax.schedules import default_gamma_min, default_gamma_u, make_schedule
from diffode_jax.time_sampling import make_time_sampler
from diffode_jax.train_state import check_training_config

EVAL_OVERRIDES = ("dequantization", "num_importance", "analytic_entropy", "divergence",
                  "gamma_u", "precision", "exact_trace_chunk")
# Fields that do not change what a workdir trained, with the value a workdir written
# before they existed used; read_workdir_config fills them in when config.json lacks them.
ADDED_FIELDS = {("model", "remat"): False,
                ("training", "precision"): precision.DEFAULT_TRAIN_PRECISION,
                ("eval", "precision"): precision.DEFAULT_EVAL_PRECISION,
                ("eval", "exact_trace_chunk"): None,
                ("eval", "norm"): ode.DEFAULT_NORM, ("eval", "time"): ode.DEFAULT_TIME,
                ("sample", "norm"): ode.DEFAULT_NORM, ("sample", "time"): ode.DEFAULT_TIME,
                ("eval", "reproducibility_check"): True}
# Values renamed since: a config.json written before holds the old name, read as the new.
RENAMED_VALUES = {("training", "dequantization"): {"uniform": "u"},
                  ("model", "time_proj"): {"dense": "with_bias"}}

__all__ = ["ARCHS", "ConfigError", "EvalSettings", "SampleSettings", "eval_settings",
           "finalize_config", "read_workdir_config", "sample_settings"]


def finalize_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of config with derived fields filled in and the choices validated."""
  config = copy.deepcopy(config)
  check_fields(config)  # every field's own range (config_fields.FIELDS), then the relations
  v = config.data.num_levels
  with config.unlocked():
    if config.model.gamma_min is None:
      config.model.gamma_min = default_gamma_min(v)
    if config.eval.gamma_u is None:
      config.eval.gamma_u = default_gamma_u(v)
    m = config.model
    if m.get("fourier_max") is None:  # the coarsest frequency whose period fits in a bin
      m.fourier_max = math.ceil(math.log2(v)) - 1
    if m.get("fourier_min") is None:
      m.fourier_min = m.fourier_max - 1
  if config.model.fourier_min > config.model.fourier_max:
    raise ConfigError(f"model.fourier_min ({config.model.fourier_min}) must not exceed "
                      f"model.fourier_max ({config.model.fourier_max})")
  if not config.model.gamma_min < config.model.gamma_max:
    raise ConfigError(f"model.gamma_min ({config.model.gamma_min:g}) must be below "
                      f"model.gamma_max ({config.model.gamma_max:g})")
  try:
    check_data_config(config.data)
    check_network_config(config.model)
    check_training_config(config.training)
    precision.check(config.training.precision, "training.precision")
    schedule = make_schedule(config.model)
    make_parameterization(config.model, schedule)
    make_time_sampler(config, schedule)
    eval_settings(config)
    sample_settings(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.model.second_order and config.model.parameterization != "velocity":
    raise ConfigError("model.second_order applies to the velocity parameterization")
  return config


# What defines a trained model: a run resumed, evaluated or sampled takes these from the
# workdir's config.json; a command line that sets one to another value is an error.
MODEL_FIELDS = {
    "model": ("arch", "schedule", "parameterization", "gamma_min", "gamma_max", "channels",
              "num_blocks", "embed_dim", "attention", "block_attention", "num_groups",
              "fourier_features", "fourier_min", "fourier_max", "base_measure_skip",
              "cond_input", "time_proj", "time_embedding"),
    "data": ("image_size", "image_width", "channels", "num_levels", "augment",
             "reduce_bits"),
}
# Also fixed for a resumed training run: its data and data order, and what one step is.
# (The objective and optimizer settings may change on resume, e.g. a lower learning rate.)
RESUME_FIELDS = {
    "seed": None,
    "data": ("dataset", "folder", "holdout_fraction", "tfds_name", "tfds_train_split",
             "tfds_image_key"),
    "training": ("batch_size", "grad_accum_steps"),
}
# The split a model is evaluated on must be the one it was not trained on: an image folder
# pool held out with another fraction (or seed-free hash) would score training images.
SPLIT_FIELDS = {"data": ("holdout_fraction",)}


def _fields(table):
  for section, names in table.items():
    if names is None:
      yield section
    else:
      for name in names:
        yield f"{section}.{name}"


def _get(config, path):
  node = config
  for part in path.split("."):
    node = node.get(part) if hasattr(node, "get") else None
  return node


def reconcile_with_workdir(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                           command_line_fields: set[str] | None = None,
                           resume: bool = False) -> ml_collections.ConfigDict:
  """config with the fields that define saved's model (and, resuming, its run) taken from
  ``saved`` (a workdir's finalized config.json).

  ``command_line_fields``: the dotted field names set on the command line (None: every field of
  ``config`` counts as set, as for an in-process call). A field set there whose value
  differs from the workdir's raises ConfigError naming the field and both values; a field
  not set explicitly silently takes the workdir's value. With ``data.folder`` unchanged,
  ``data.holdout_fraction`` must match too (another fraction would evaluate training
  images).
  """
  tables = [MODEL_FIELDS] + ([RESUME_FIELDS] if resume else [])
  paths_to_check = [p for table in tables for p in _fields(table)]
  if not resume and _get(config, "data.folder") == _get(saved, "data.folder") \
      and _get(config, "data.dataset") == _get(saved, "data.dataset"):
    paths_to_check += list(_fields(SPLIT_FIELDS))
  config = copy.deepcopy(config)
  for path in paths_to_check:
    section, _, name = path.rpartition(".")
    if section and name not in saved[section]:
      continue  # written before the field existed: its default is what was used
    want, got = _get(saved, path), _get(config, path)
    if want == got or (isinstance(want, float) and isinstance(got, float)
                       and math.isclose(want, got, rel_tol=1e-12, abs_tol=0.0)):
      continue
    if command_line_fields is None or path in command_line_fields:
      what = "resumed training run" if resume else "trained model"
      raise ConfigError(f"{path}={got!r} contradicts the workdir's config.json ({want!r}), "
                        f"which defines the {what}; drop the override or use another "
                        f"workdir")
    with config.unlocked():
      if section:
        config[section][name] = want
      else:
        config[name] = want
  return config


def eval_settings(config: ml_collections.ConfigDict, **overrides: Any) -> EvalSettings:
  """EvalSettings from config.eval; overrides accept the EvalSettings and solver fields.

  Raises ConfigError for an unknown override or a value that cannot work.
  """
  e = config.eval
  solver_fields = {f.name for f in dataclasses.fields(ode.SolverConfig)}
  solver_kw = {k: v for k, v in overrides.items() if k in solver_fields}
  rest = {k: v for k, v in overrides.items() if k not in solver_fields}
  unknown = set(rest) - set(EVAL_OVERRIDES)
  if unknown:
    raise ConfigError(f"unknown evaluation override(s): {sorted(unknown)}; expected "
                      f"{sorted(set(EVAL_OVERRIDES) | solver_fields)}")
  for name, value in overrides.items():  # the API's keyword overrides: the config's ranges
    if f"eval.{name}" in FIELDS:
      check_value(f"eval.{name}", value)
  kw = {name: e[name] for name in EVAL_OVERRIDES}
  kw.update(rest)
  try:
    settings = EvalSettings(solver=ode.SolverConfig.from_section(e, **solver_kw), **kw)
  except (TypeError, ValueError) as err:
    raise ConfigError(str(err)) from None
  m = config.model
  if settings.dequantization == "u" and not m.gamma_min <= settings.gamma_u < m.gamma_max:
    # The u bound integrates the model's ODE from gamma_u to gamma_max: outside the
    # schedule's range it is not a bound of this model.
    raise ConfigError(f"eval.gamma_u={settings.gamma_u:g} must lie in the model's range "
                      f"[model.gamma_min, model.gamma_max) = [{m.gamma_min:g}, "
                      f"{m.gamma_max:g}) for dequantization=u")
  return settings


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The finalized config.json of a training workdir.

  Raises CheckpointError if there is none or it is not valid JSON, ConfigError if it lacks
  a field this version needs (written by an older version) or holds a bad value.
  """
  path = paths.config_path(workdir)
  if not storage.exists(path):
    raise CheckpointError(f"no config.json in {workdir!r}: not a training workdir")
  try:
    raw = json.loads(storage.read_text(path))
    for (section, name), value in ADDED_FIELDS.items():
      if isinstance(raw, dict) and isinstance(raw.get(section), dict):
        raw[section].setdefault(name, value)
    for (section, name), renamed in RENAMED_VALUES.items():
      fields = raw.get(section) if isinstance(raw, dict) else None
      if isinstance(fields, dict) and isinstance(fields.get(name), str):
        fields[name] = renamed.get(fields[name], fields[name])
    config = ml_collections.ConfigDict(raw)
  except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path} is not a valid config.json ({described(e)})") from None
  try:
    return finalize_config(config)
  except (AttributeError, KeyError) as e:  # a field this version needs is missing
    missing = str(e.args[0] if e.args else e).strip("\"'")  # ConfigDict quotes it twice
    raise ConfigError(f"{path} lacks the config field '{missing}'; was it written by an "
                      f"older version of diffode_jax?") from None
