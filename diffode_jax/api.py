"""The Python API: a trained (or oracle) model with bpd, log_prob and sample.

    import diffode_jax as dj
    model = dj.load("runs/digits")                  # EMA params of the latest checkpoint
    bpd, report = model.bpd(images, jax.random.PRNGKey(0), dequantization="u")
    rows, report = model.per_image(images, key)     # per-image rows: bpd, sde_bpd, nfe
    log_p = model.log_prob(images, key)             # nats, lower bound on log P(k)
    samples = model.sample(key, 16)                 # integer images (uint8 for V <= 256)
    dx = model.drift(x, gamma)                      # probability-flow dx/dgamma

    oracle = dj.oracle(train_images, config)        # closed form of a finite set
    mine = dj.from_fn(fn, params, predicts="eps", **dj.path("vp_cosine"), num_levels=256,
                      data_range=(-1, 1), image_shape=(32, 32, 3))  # a user's own model
    log_prob = model.log_prob_fn()                  # pure (params, images, key) -> nats

Evaluation settings come from the config's ``eval`` section; change them per call with
keyword overrides (``dequantization="u"``) or a whole ``dj.EvalSettings`` (``settings=``).
The evaluation runs the loop of ``--mode=eval_bpd`` (``evaluation.evaluate_batches``): with
``key = dj.eval_key(model.config)`` and the config's batch size the numbers equal
eval/per_image.jsonl's. Every call uses all of this process's devices
(``jax.local_devices()``): each batch is split over them as in ``--mode=eval_bpd``, so
the batch size must be a multiple of their number. Nothing here writes files, and nothing
here depends on the command-line runner (``diffode_jax.run``). Errors are
``diffode_jax.errors.DiffodeError``s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy.typing as npt
from jax.sharding import Mesh

from diffode_jax import data as data_lib
from diffode_jax import ode, own_model, parallel, paths, storage
from diffode_jax import precision as precision_lib
from diffode_jax.dequantization import DEFAULT_EVAL_DEQUANTIZATION
from diffode_jax.trained import restore_for_eval
from diffode_jax.config import (EvalSettings, eval_settings, finalize_config,
                                read_workdir_config, sample_settings)
from diffode_jax.differentiable import PureLogProbFn, make_pure_log_prob_fn
from diffode_jax.errors import ConfigError, DataError, LikelihoodError, WorkdirError, first_line
from diffode_jax.evaluation import evaluate_batches
from diffode_jax.likelihood import DEFAULT_EVAL_SOLVER, LogProbFn, make_log_prob_fn, make_sde_fn
from diffode_jax.model import Components, build
from diffode_jax.fingerprint import images_fingerprint, params_fingerprint
from diffode_jax.own_model import FnComponents, UserFn
from diffode_jax.report import bpd_report, devices_fields, run_fields
from diffode_jax.sampling import DEFAULT_DECODE, DEFAULT_SAMPLE_SOLVER, draw, make_sample_fn
from diffode_jax.schedules import default_gamma_min, default_gamma_u


@dataclasses.dataclass
class Model:
  """A finalized config, its Components and the params to evaluate (EMA for checkpoints).

  ``step`` is the checkpoint step (None for the oracle and a user's fn). A user's model
  (``from_fn``) has ``FnComponents``: no training loss, so no ``sde_bpd`` in its rows.
  """

  config: ml_collections.ConfigDict
  components: Components | FnComponents
  params: Any
  step: int | None = None
  _cache: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)

  def eval_settings(self, settings: EvalSettings | None = None, **overrides: Any
                    ) -> EvalSettings:
    """The EvalSettings of a call: ``settings`` as given, else config.eval with overrides."""
    if settings is not None:
      if overrides:
        raise ConfigError("pass either settings= or keyword overrides, not both")
      if not isinstance(settings, EvalSettings):
        raise ConfigError(f"settings must be a diffode_jax.EvalSettings, got "
                          f"{type(settings).__name__}")
      return settings
    return eval_settings(self.config, **overrides)

  def _check(self, images: npt.ArrayLike) -> np.ndarray:
    try:
      images = np.asarray(images)
    except (TypeError, ValueError) as err:  # ragged lists, objects numpy cannot stack
      raise DataError(f"images must be an integer array (N, H, W, C): {err}") from None
    if not np.issubdtype(images.dtype, np.integer):
      raise DataError(f"images must be integers in [0, data.num_levels), got dtype "
                      f"{images.dtype}")
    if images.size and images.min() < 0:
      raise DataError(f"images hold a negative value {int(images.min())}")
    data_lib.check_images(images, self.config.data, "images")
    return images

  def with_params(self, params: Any) -> Model:
    """The same model with other params (e.g. after a fine-tune of ``log_prob_fn``), sharing
    this model's compiled functions (they take the params as an argument)."""
    try:
      jax.tree.map(lambda a, b: None, params, self.params)  # the same tree structure
    except ValueError as err:
      raise ConfigError(f"with_params: the params must have the structure of model.params "
                        f"({first_line(err)})") from None
    return dataclasses.replace(self, params=params, _cache=self._cache)

  @property
  def mesh(self) -> Mesh:
    """The data-parallel mesh of this process's devices that every call uses."""
    if "mesh" not in self._cache:
      self._cache["mesh"] = parallel.local_mesh()
    return self._cache["mesh"]

  def _log_prob_fn(self, settings: EvalSettings) -> LogProbFn:
    if settings not in self._cache:
      c = self.components
      self._cache[settings] = make_log_prob_fn(c.drift, c.schedule, c.num_levels, settings,
                                               self.mesh)
    return self._cache[settings]

  def _rows(self, images: npt.ArrayLike, key: jax.Array, settings: EvalSettings, batch_size: int,
            with_sde: bool) -> list[dict[str, Any]]:
    images = self._check(images)
    key = _check_key(key)
    c = self.components
    log_prob = self._log_prob_fn(settings)
    if log_prob.mesh is not None:
      parallel.check_batch(batch_size, "batch_size", self.mesh.size)
    sde_fn = None
    if with_sde and c.loss_fn is not None:
      sde_key = ("sde", settings.precision)
      if sde_key not in self._cache:
        self._cache[sde_key] = make_sde_fn(c.loss_fn, settings, self.mesh)
      sde_fn = self._cache[sde_key]
    rows: list[dict[str, Any]] = []
    try:
      for batch_rows in evaluate_batches(log_prob, self.params, images, batch_size, key,
                                         settings, c.dim, sde_fn):
        rows.extend(batch_rows)
    except LikelihoodError as err:
      if not isinstance(c, FnComponents):
        raise
      lo = len(rows)  # the failed batch starts here
      raise c.nonfinite_error(self.params, images[lo:lo + batch_size], lo, err) from None
    return rows

  def log_prob_fn(self, settings: EvalSettings | None = None, **eval_overrides: Any
                  ) -> PureLogProbFn:
    """A pure ``(params, images, key) -> jax.Array (N,)``: the bound on log P(k) in nats,
    jit-able and differentiable with respect to params (``differentiable.py``: diffrax's
    RecursiveCheckpointAdjoint). Settings as ``bpd``; a diffrax solver only. With
    ``jax.random.fold_in(key, 0)`` and all images in one batch it equals
    ``log_prob(images, key)`` on one device (without jax_enable_x64, under which it
    solves in float64 and the evaluator in float32)."""
    settings = self.eval_settings(settings, **eval_overrides)
    c = self.components
    return make_pure_log_prob_fn(c.drift, c.schedule, c.num_levels, settings)

  def bpd(self, images: npt.ArrayLike, key: jax.Array, batch_size: int | None = None, *,
          settings: EvalSettings | None = None, **eval_overrides: Any
          ) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-image bits/dim (float64, shape (N,)) and a report with the fields of
    eval/bpd.json.

    images: integers (N, H, W, C) in [0, data.num_levels). eval_overrides: any of
    dequantization, num_importance, analytic_entropy, divergence, gamma_u, solver, rtol,
    atol, max_steps (defaults from config.eval), or a whole ``settings``. Raises
    LikelihoodError when the solver fails, ConfigError for a bad override, DataError for
    bad images.
    """
    rows, report = self.per_image(images, key, batch_size, settings=settings,
                                  **eval_overrides)
    return np.array([r["bpd"] for r in rows]), report

  def per_image(self, images: npt.ArrayLike, key: jax.Array, batch_size: int | None = None, *,
                settings: EvalSettings | None = None, **eval_overrides: Any
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of eval/per_image.jsonl (one dict per image: index, log_prob, bpd, nfe,
    sde_bpd, ...) and the report of ``bpd``; arguments as bpd. For paired comparisons
    that need more than the ODE bound per image (e.g. the ELBO of the same images)."""
    start = time.perf_counter()
    settings = self.eval_settings(settings, **eval_overrides)
    batch_size = _check_count("batch_size", batch_size, self.config.eval.batch_size)
    rows = self._rows(images, key, settings, batch_size, with_sde=True)
    fields = run_fields(self.config, settings, self.components.schedule, self.step,
                        batch_size)
    fields["params_fingerprint"] = params_fingerprint(self.params)
    num_devices = self.mesh.size if self._log_prob_fn(settings).mesh is not None else 1
    return rows, bpd_report(fields, rows, time.perf_counter() - start,
                            images_fingerprint=images_fingerprint(images),
                            **devices_fields(num_devices))

  def log_prob(self, images: npt.ArrayLike, key: jax.Array, batch_size: int | None = None, *,
               settings: EvalSettings | None = None, **eval_overrides: Any) -> np.ndarray:
    """Per-image lower bound on log P(k) in nats (float64, shape (N,)); arguments as bpd."""
    settings = self.eval_settings(settings, **eval_overrides)
    batch_size = _check_count("batch_size", batch_size, self.config.eval.batch_size)
    rows = self._rows(images, key, settings, batch_size, with_sde=False)
    return np.array([r["log_prob"] for r in rows])

  def drift(self, x: npt.ArrayLike, gamma: float) -> np.ndarray:
    """The probability-flow drift dx/dgamma (numpy float32, x's shape) of a float batch x
    (B, H, W, C) at a scalar gamma, with these params and conditioning zero (the
    untransformed images), no dropout."""
    x = np.asarray(x, np.float32)
    want = data_lib.image_shape(self.config.data)
    if x.ndim != 4 or x.shape[1:] != want:
      raise DataError(f"drift needs a batch of shape (B,) + {want}, got {x.shape}")
    if "drift" not in self._cache:
      self._cache["drift"] = jax.jit(self.components.drift)
    return np.asarray(self._cache["drift"](self.params, jnp.asarray(x), jnp.float32(gamma)))

  def sample(self, key: jax.Array, n: int, batch_size: int | None = None) -> np.ndarray:
    """n integer images (N, H, W, C) drawn with config.sample's settings
    (``data.level_dtype``: uint8 for V <= 256)."""
    key = _check_key(key)
    n = _check_count("n", n)
    batch_size = _check_count("batch_size", batch_size, self.config.sample.batch_size)
    parallel.check_batch(batch_size, "batch_size", self.mesh.size)
    shape = (batch_size,) + data_lib.image_shape(self.config.data)
    cache_key = ("sample", shape)
    if cache_key not in self._cache:
      c = self.components
      self._cache[cache_key] = make_sample_fn(c.drift, c.schedule, c.num_levels, shape,
                                              sample_settings(self.config), self.mesh)
    images, _ = draw(self._cache[cache_key], self.params, key, n, batch_size)
    return images


def _check_key(key: Any) -> jax.Array:
  """key as a JAX PRNG key, or a ConfigError saying what a key is."""
  try:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      return key
    arr = jnp.asarray(key)
  except (TypeError, ValueError):
    arr = None
  if arr is None or arr.dtype != jnp.uint32 or arr.shape != (2,):
    got = (type(key).__name__ if arr is None
           else f"{type(key).__name__} of dtype {arr.dtype} and shape {arr.shape}")
    raise ConfigError(f"key must be a JAX PRNG key (jax.random.PRNGKey(0), jax.random.key(0) "
                      f"or dj.eval_key(config)), got {got}")
  return arr


def _check_count(name: str, value: Any, default: int | None = None) -> int:
  """A positive int argument (``default`` where value is None), or a ConfigError."""
  if value is None and default is not None:
    value = default
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def evaluations(workdir: str) -> dict[str, Any]:
  """Every ``--mode=eval_bpd`` evaluation of a workdir, from eval/index.json:
  ``{"latest": name of the latest finished one, "evaluations": {name: entry}}``, each entry
  with its checkpoint step, split, settings, image count, params fingerprint, ``finished``
  and, once finished, bpd and its standard error."""
  workdir = paths.expand(workdir)
  paths.check_supported(workdir)
  return paths.read_eval_index(workdir)


def read_evaluation(workdir: str, name: str | None = None) -> tuple[dict[str, Any], list[Any]]:
  """(report, per-image rows) of the evaluation ``name`` of a workdir (None: the latest
  finished one). Raises WorkdirError when there is no such (finished) evaluation."""
  index = evaluations(workdir)
  name = index["latest"] if name is None else name
  entry = index["evaluations"].get(name) if name else None
  if entry is None or not entry.get("finished"):
    known = sorted(n for n, e in index["evaluations"].items() if e.get("finished"))
    raise WorkdirError(f"{paths.expand(workdir)} has no finished evaluation "
                       f"{name!r}; finished ones: {known or 'none'}")
  workdir = paths.expand(workdir)
  report = json.loads(storage.read_text(paths.eval_report_path(workdir, name)))
  rows = storage.read_jsonl(paths.eval_rows_path(workdir, name))[1:]
  return report, rows


def load(workdir: str, step: int | None = None) -> Model:
  """The model of a training workdir: its config.json and a checkpoint's EMA params.

  ``step`` None restores the latest checkpoint. Raises CheckpointError if the workdir has
  no (valid) config.json or no (matching) checkpoint, ConfigError if config.json lacks a
  field, WorkdirError for an unsupported workdir (a URL other than gs://, a bucket that does
  not exist or cannot be read). ``workdir`` may be local or ``gs://bucket/run``.
  """
  workdir = paths.expand(workdir)
  paths.check_supported(workdir)
  config = read_workdir_config(workdir)
  components, params, ckpt_step = restore_for_eval(config, workdir, step)
  return Model(config, components, params, ckpt_step)


def oracle(train_images: npt.ArrayLike, config: ml_collections.ConfigDict) -> Model:
  """The closed-form model of the integer images train_images (docs/design.md, The oracle) under
  config.

  config.model chooses schedule and parameterization; model.arch is set to 'oracle'.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.arch = "oracle"
  config = finalize_config(config)
  train_images = np.asarray(train_images)
  if not np.issubdtype(train_images.dtype, np.integer):
    raise DataError(f"training images must be integers, got dtype {train_images.dtype}")
  data_lib.check_images(train_images, config.data, "oracle training images")
  components = build(config, train_images=train_images)
  # the oracle's init_params ignores its key (its params are the training images)
  return Model(config, components, components.init_params(None), None)  # type: ignore[arg-type]


def from_fn(fn: UserFn, params: Any, *, predicts: str, alpha: Callable[[jax.Array], jax.Array],
            sigma: Callable[[jax.Array], jax.Array], t_min: float, t_max: float,
            num_levels: int, data_range: tuple[float, float],
            image_shape: tuple[int, int, int],
            t_of_gamma: Callable[[jax.Array], jax.Array] | None = None) -> Model:
  """The model of a user's own network ``fn(params, x, t)`` (docs/own_model.md).

  fn: any JAX function of a batch x (B, H, W, C) in the model's units and t (B,),
  returning x's shape and dtype: the noise (``predicts="eps"``), the data (``"x0"``, a
  denoiser), the score grad_x log p_t (``"score"``) or dx/dt along the path
  (``"dx_dt"``, a flow-matching velocity). alpha, sigma: the forward path
  x_t = alpha(t) y + sigma(t) eps as elementwise JAX functions of t (``path(name)`` gives
  common ones); log(sigma^2 / alpha^2) must increase on [t_min, t_max], t_min must be
  clean enough for the tn start and t_max reach noise. data_range (lo, hi): level k maps to
  lo + (hi - lo) (k + 1/2) / V in the model's units. t_of_gamma: optional closed-form
  inverse of t -> log(sigma^2 / alpha^2). Raises ConfigError (one line) for anything that
  cannot work.
  """
  if predicts not in own_model.PREDICTS:
    raise ConfigError(f"unknown predicts {predicts!r}; expected one of {own_model.PREDICTS}")
  if (isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer))
      or num_levels < 2):
    raise ConfigError(f"num_levels must be an integer >= 2, got {num_levels!r}")
  try:
    shape = tuple(int(n) for n in image_shape)
  except (TypeError, ValueError):
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f"image_shape must be (H, W, C) of positive integers, got "
                      f"{image_shape!r}")
  try:
    lo, hi = (float(v) for v in data_range)
  except (TypeError, ValueError):
    raise ConfigError(f"data_range must be (lo, hi), got {data_range!r}") from None
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    raise ConfigError(f"data_range must be finite with lo < hi, got {data_range!r}")
  num_levels = int(num_levels)
  path = own_model.check_path(alpha, sigma, t_min, t_max, (hi - lo) / 2, (hi + lo) / 2,
                              num_levels, t_of_gamma)
  own_model.probe_fn(fn, params, shape)
  gamma_min = default_gamma_min(num_levels)
  gamma_max = path.gamma_max
  schedule = own_model.PathSchedule("user", gamma_min, gamma_max, path)
  components = own_model.FnComponents(schedule, fn, predicts, math.prod(shape), num_levels)
  config = ml_collections.ConfigDict({
      "seed": 0,
      "data": {"dataset": "from_fn", "image_size": shape[0], "image_width": shape[1],
               "channels": shape[2], "num_levels": num_levels},
      "model": {"arch": "from_fn", "schedule": "user", "parameterization": predicts,
                "gamma_min": gamma_min, "gamma_max": gamma_max, "t_min": float(t_min),
                "t_max": float(t_max), "t_end": path.t_end, "data_range": [lo, hi]},
      "eval": {"dequantization": DEFAULT_EVAL_DEQUANTIZATION, "num_importance": 1,
               "analytic_entropy": False, "divergence": ode.DEFAULT_DIVERGENCE,
               "gamma_u": default_gamma_u(num_levels),
               "precision": precision_lib.DEFAULT_EVAL_PRECISION,
               "exact_trace_chunk": None, "batch_size": 128,
               **DEFAULT_EVAL_SOLVER.section_fields()},
      "sample": {"decode": DEFAULT_DECODE, "batch_size": 64, **DEFAULT_SAMPLE_SOLVER.section_fields()},
  })
  return Model(config, components, params, None)
