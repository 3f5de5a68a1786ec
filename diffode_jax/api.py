"""The Python API: a trained (or oracle) model with bpd, log_prob and sample.

    import diffode_jax as dj
    model = dj.load("runs/digits")                  # EMA params of the latest checkpoint
    bpd, report = model.bpd(images, jax.random.PRNGKey(0), dequantization="u")
    log_p = model.log_prob(images, key)             # nats, lower bound on log P(k)
    samples = model.sample(key, 16)                 # uint8 integer images
    dx = model.drift(x, gamma)                      # probability-flow dx/dgamma

    oracle = dj.oracle(train_images, config)        # closed form of a finite set (SPEC 6)

The evaluation runs the same loop as ``--mode=eval_bpd`` (``likelihood.evaluate_batches``):
with ``key = run.eval_key(config)`` and the config's batch size the numbers match
eval/per_image.jsonl exactly. Nothing here writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffode_jax import data as data_lib
from diffode_jax import run
from diffode_jax.checkpoint import CheckpointError
from diffode_jax.likelihood import (evaluate_batches, make_log_prob_fn, settings_report,
                                    summarize)
from diffode_jax.model import Components, ConfigError, build, eval_settings, finalize_config
from diffode_jax.sampling import draw, make_sample_fn, sample_settings


@dataclasses.dataclass
class Model:
  """A finalized config, its Components and the params to evaluate (EMA for checkpoints).

  ``step`` is the checkpoint step (None for the oracle).
  """

  config: ml_collections.ConfigDict
  components: Components
  params: Any
  step: int | None = None
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def _settings(self, overrides):
    try:
      return eval_settings(self.config, **overrides)
    except (ValueError, TypeError) as e:
      raise ConfigError(str(e)) from None

  def _check(self, images) -> np.ndarray:
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.integer):
      raise data_lib.DataError(f"images must be integers in [0, data.num_levels), got "
                               f"dtype {images.dtype}")
    if images.size and images.min() < 0:
      raise data_lib.DataError(f"images hold a negative value {int(images.min())}")
    data_lib.check_images(images, self.config.data, "images")
    return images

  def _rows(self, images, key, overrides, batch_size, with_sde):
    images = self._check(images)
    settings = self._settings(overrides)
    batch_size = batch_size or self.config.eval.batch_size
    c = self.components
    if settings not in self._cache:
      self._cache[settings] = make_log_prob_fn(c.drift, c.schedule, c.num_levels, settings)
    sde_fn = None
    if with_sde:
      if "sde" not in self._cache:
        self._cache["sde"] = jax.jit(
            lambda p, k, key: c.loss_fn(p, k, key, False)[1].sde_nats())
      sde_fn = self._cache["sde"]
    rows = []
    for batch_rows in evaluate_batches(self._cache[settings], self.params, images,
                                       batch_size, key, settings, c.dim, sde_fn):
      rows.extend(batch_rows)
    return rows, settings

  def bpd(self, images, key, batch_size: int | None = None, **eval_overrides):
    """Per-image bits/dim (numpy float64) and a report with the fields of eval/bpd.json.

    eval_overrides: dequantization, num_importance, analytic_entropy, divergence, gamma_u,
    solver, rtol, atol, max_steps (defaults from config.eval). Raises LikelihoodError when
    the solver fails, ConfigError for an unknown override, DataError for bad images.
    """
    start = time.perf_counter()
    rows, settings = self._rows(images, key, eval_overrides, batch_size, with_sde=True)
    report = {"checkpoint_step": self.step, "arch": self.config.model.arch,
              "batch_size": batch_size or self.config.eval.batch_size,
              "gamma_min": self.config.model.gamma_min,
              "gamma_u": settings.gamma_u if settings.dequantization == "u" else None}
    report.update(settings_report(settings, self.components.schedule))
    report.update(summarize(rows))
    report["wall_time_s"] = time.perf_counter() - start
    return np.array([r["bpd"] for r in rows]), report

  def log_prob(self, images, key, batch_size: int | None = None, **eval_overrides):
    """Per-image lower bound on log P(k) in nats (numpy float64); overrides as in bpd."""
    rows, _ = self._rows(images, key, eval_overrides, batch_size, with_sde=False)
    return np.array([r["log_prob"] for r in rows])

  def drift(self, x, gamma):
    """The probability-flow drift dx/dgamma (numpy float32, x's shape) of a float batch x
    (B, H, W, C) at a scalar gamma, with these params and conditioning zero (the
    untransformed images), no dropout."""
    x = np.asarray(x, np.float32)
    want = data_lib.image_shape(self.config.data)
    if x.ndim != 4 or x.shape[1:] != want:
      raise data_lib.DataError(f"drift needs a batch of shape (B,) + {want}, got {x.shape}")
    if "drift" not in self._cache:
      self._cache["drift"] = jax.jit(self.components.drift)
    return np.asarray(self._cache["drift"](self.params, jnp.asarray(x), jnp.float32(gamma)))

  def sample(self, key, n: int, batch_size: int | None = None):
    """n integer images (uint8 for V <= 256) drawn with config.sample's settings."""
    batch_size = batch_size or self.config.sample.batch_size
    d = self.config.data
    shape = (batch_size,) + data_lib.image_shape(d)
    cache_key = ("sample", shape)
    if cache_key not in self._cache:
      c = self.components
      self._cache[cache_key] = make_sample_fn(c.drift, c.schedule, c.num_levels, shape,
                                              sample_settings(self.config))
    images, _ = draw(self._cache[cache_key], self.params, key, n, batch_size)
    return images


def load(workdir: str, step: int | None = None) -> Model:
  """The model of a training workdir: its config.json and a checkpoint's EMA params.

  ``step`` None restores the latest checkpoint. Raises CheckpointError if the workdir has
  no config.json or no (matching) checkpoint, ConfigError if config.json lacks a field.
  """
  run.check_local_workdir(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"no config.json in {workdir!r}: not a training workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  try:
    config = finalize_config(config)
  except (AttributeError, KeyError) as e:  # a field this version needs is missing
    missing = str(e.args[0] if e.args else e).strip("\"'")  # ConfigDict quotes it twice
    raise ConfigError(f"{path} lacks the config field '{missing}'; was it written by an "
                      f"older version of diffode_jax?") from None
  components, params, ckpt_step = run.model_for_eval(config, workdir, step)
  return Model(config, components, params, ckpt_step)


def oracle(train_images, config) -> Model:
  """The closed-form model of the integer images train_images (SPEC 6) under config.

  config.model chooses schedule and parameterization; model.arch is set to 'oracle'.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.arch = "oracle"
  config = finalize_config(config)
  train_images = np.asarray(train_images)
  if not np.issubdtype(train_images.dtype, np.integer):
    raise data_lib.DataError(f"training images must be integers, got dtype "
                             f"{train_images.dtype}")
  data_lib.check_images(train_images, config.data, "oracle training images")
  components = build(config, train_images=train_images)
  return Model(config, components, components.init_params(None), None)
