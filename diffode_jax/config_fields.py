"""The valid values of every config field, as one table checked once at finalization.

``FIELDS`` maps each field of ``configs/default.py`` to a rule: a type with its range, a
set of choices, a flag, or text. ``check_fields`` applies the table to a config (fields set
to ``None`` where the rule allows it are derived later) and raises ``ConfigError`` with one
line naming the field, the value and what is allowed; ``check_value`` applies one rule (the
Python API checks its keyword overrides with it). ``markdown_table`` is the table of
docs/configuration.md, which a test keeps equal to this one. Checks that involve several
fields (gamma_u inside the schedule's range, a time-aware network) follow in
``diffode_jax.config``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional, Sequence, TypeAlias

from diffode_jax.data.spec import DATASETS
from diffode_jax.dequantization import EVAL_DEQUANTIZATIONS, TRAIN_DEQUANTIZATIONS
from diffode_jax.errors import ConfigError
from diffode_jax.keys import SDE_KEY_INDEX
from diffode_jax.networks.unet import COND_INPUTS, TIME_EMBEDDINGS, TIME_PROJS
from diffode_jax.ode import DIVERGENCES, NORMS, SOLVERS, TIMES
from diffode_jax.parameterization import PARAMETERIZATIONS
from diffode_jax.precision import PRECISIONS
from diffode_jax.sampling import DECODES
from diffode_jax.schedules import SCHEDULES
from diffode_jax.train_state import DECAY_MASKS

if TYPE_CHECKING:
  import ml_collections


@dataclasses.dataclass(frozen=True)
class Number:
  """An integer (``integer=True``) or a real number in a range; None where ``optional``."""
  integer: bool = False
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False  # low itself excluded
  high_open: bool = False
  optional: str = ""  # what None means; empty: None is not allowed
  zero: str = ""  # 0 is allowed beside the range, meaning this (e.g. "off")

  def ok(self, v: Any) -> bool:
    if v is None:
      return bool(self.optional)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if self.integer and not isinstance(v, int):
      return False
    if not math.isfinite(v):
      return False
    if self.zero and v == 0:
      return True
    if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
      return False
    return self.high is None or (v < self.high if self.high_open else v <= self.high)

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    if self.low is not None and self.high is not None:
      text = (f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, "
              f"{_num(self.high)}{')' if self.high_open else ']'}")
    elif self.low is not None:
      text = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
    elif self.high is not None:
      text = f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
    else:
      text = f"a finite {kind[2:] if kind.startswith('a ') else kind[3:]}"
    if self.zero:
      text = f"0 ({self.zero}) or {text}"
    if self.optional:
      text += f", or None ({self.optional})"
    return text


@dataclasses.dataclass(frozen=True)
class Choice:
  choices: Sequence[str]
  hint: str = ""  # appended to the error, formatted with the value

  def ok(self, v: Any) -> bool:
    return isinstance(v, str) and v in self.choices

  def describe(self) -> str:
    return "one of " + ", ".join(self.choices)


@dataclasses.dataclass(frozen=True)
class Flag:
  def ok(self, v: Any) -> bool:
    return isinstance(v, bool)

  def describe(self) -> str:
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Text:
  optional: str = ""

  def ok(self, v: Any) -> bool:
    return (v is None and bool(self.optional)) or (isinstance(v, str) and v != "")

  def describe(self) -> str:
    return "a non-empty string" + (f", or None ({self.optional})" if self.optional else "")


def _num(x: float) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


def Int(low: float | None = None, high: float | None = None,  # noqa: N802 (reads as a type)
        **kw: Any) -> Number:
  return Number(integer=True, low=low, high=high, **kw)


def Real(low: float | None = None, high: float | None = None,  # noqa: N802
         **kw: Any) -> Number:
  return Number(integer=False, low=low, high=high, **kw)


ARCHS = ("unet", "oracle")
POSITIVE = Real(0, low_open=True)
# A solve looser than this is not a number to report (at 1e-3 the digits' mean already
# moves by 0.01 bits/dim; docs/evaluation.md).
TOLERANCE = Real(0, 0.1, low_open=True)
UNIT = Real(0, 1, high_open=True)  # a rate or a moment decay: 1 would never move

# The rule of one field.
Rule: TypeAlias = Number | Choice | Flag | Text

FIELDS: dict[str, Rule] = {
    "seed": Int(0),
    # data
    "data.dataset": Choice(DATASETS, hint="any tfds image data set: --config.data.dataset=tfds "
                                  "--config.data.tfds_name={value}"),
    "data.image_size": Int(1),
    "data.image_width": Int(1, optional="square images"),
    "data.channels": Int(1),
    "data.num_levels": Int(2),
    "data.tfds_data_dir": Text(optional="tfds's default"),
    "data.tfds_name": Text(optional="only dataset=tfds needs one"),
    "data.tfds_train_split": Text(),
    "data.tfds_test_split": Text(),
    "data.tfds_image_key": Text(),
    "data.folder": Text(optional="only dataset=image_folder needs one"),
    "data.holdout_fraction": UNIT,
    "data.reduce_bits": Flag(),
    "data.manual_dir": Text(optional="only imagenet32_new needs one"),
    "data.augment": Flag(),
    # model
    "model.arch": Choice(ARCHS),
    "model.schedule": Choice(SCHEDULES),
    "model.parameterization": Choice(PARAMETERIZATIONS),
    "model.gamma_min": Real(optional="-2 log(3 V)"),
    "model.gamma_max": Real(),
    "model.channels": Int(1),
    "model.num_blocks": Int(1),
    "model.embed_dim": Int(1),
    "model.attention": Flag(),
    "model.block_attention": Flag(),
    "model.cond_input": Choice(COND_INPUTS),
    "model.time_proj": Choice(TIME_PROJS),
    "model.time_embedding": Choice(TIME_EMBEDDINGS),
    "model.dropout": UNIT,
    "model.num_groups": Int(1),
    "model.fourier_features": Flag(),
    "model.fourier_min": Int(optional="fourier_max - 1"),
    "model.fourier_max": Int(optional="ceil(log2 V) - 1"),
    "model.base_measure_skip": Flag(),
    "model.second_order": Flag(),
    "model.second_order_weight": Real(0),
    "model.remat": Flag(),
    # training
    "training.batch_size": Int(1),
    "training.num_steps": Int(1),
    "training.learning_rate": POSITIVE,
    "training.warmup_steps": Int(0),
    "training.b1": UNIT,
    "training.b2": UNIT,
    "training.eps": POSITIVE,
    "training.weight_decay": Real(0),
    "training.weight_decay_mask": Choice(DECAY_MASKS),
    "training.grad_clip": Real(0, low_open=True, zero="off"),
    "training.ema_decay": Real(0, 1),
    "training.ema_warmup": Flag(),
    "training.grad_accum_steps": Int(1),
    "training.importance_sampling": Flag(),
    "training.antithetic_time": Flag(),
    "training.dequantization": Choice(TRAIN_DEQUANTIZATIONS),
    "training.log_every": Int(1),
    "training.tensorboard": Flag(),
    "training.checkpoint_every": Int(1),
    "training.keep_checkpoints": Int(1),
    "training.divergence_factor": Real(1, low_open=True, zero="off"),
    "training.init_from": Text(optional="a fresh initialization"),
    "training.init_from_optimizer": Flag(),
    "training.eval_every": Int(1, zero="off"),
    "training.eval_images": Int(1),
    "training.precision": Choice(PRECISIONS),
    # eval
    "eval.split": Text(),
    "eval.dequantization": Choice(EVAL_DEQUANTIZATIONS),
    "eval.num_importance": Int(1, SDE_KEY_INDEX - 1),  # keys.py: K keys below the SDE key
    "eval.analytic_entropy": Flag(),
    "eval.divergence": Choice(DIVERGENCES),
    "eval.solver": Choice(SOLVERS),
    "eval.rtol": TOLERANCE,
    "eval.atol": TOLERANCE,
    "eval.max_steps": Int(1),
    "eval.norm": Choice(NORMS),
    "eval.time": Choice(TIMES),
    "eval.batch_size": Int(1),
    "eval.num_images": Int(1, optional="the whole split"),
    "eval.gamma_u": Real(optional="default_gamma_u(V)"),
    "eval.precision": Choice(PRECISIONS),
    "eval.exact_trace_chunk": Int(1, optional="all D tangents at once"),
    "eval.reproducibility_check": Flag(),
    # sample
    "sample.num_samples": Int(1),
    "sample.batch_size": Int(1),
    "sample.decode": Choice(DECODES),
    "sample.solver": Choice(tuple(s for s in SOLVERS if s != "scipy_rk45"),
                            hint="sampling solves on device; scipy_rk45 is the evaluator's "
                                 "host loop"),
    "sample.rtol": POSITIVE,
    "sample.atol": POSITIVE,
    "sample.max_steps": Int(1),
    "sample.norm": Choice(NORMS),
    "sample.time": Choice(TIMES),
}


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def check_value(field: str, value: Any) -> None:
  """Raises ConfigError unless value is allowed for field (a key of FIELDS)."""
  rule = FIELDS[field]
  if not rule.ok(value):
    if isinstance(rule, Choice):
      hint = f" ({rule.hint.format(value=value)})" if rule.hint else ""
      raise ConfigError(f"unknown {field} {value!r}; expected one of "
                        f"{tuple(rule.choices)}{hint}")
    raise ConfigError(f"{field} must be {rule.describe()}, got {value!r}")


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Every field of config that FIELDS names, checked against its rule (absent fields are
  skipped: a config written before a field existed gets its default elsewhere)."""
  for field in FIELDS:
    value = _lookup(config, field)
    if value is not _MISSING:
      check_value(field, value)


def markdown_table() -> str:
  """The rows of docs/configuration.md: field, what is allowed."""
  lines = ["| field | valid values |", "|---|---|"]
  lines += [f"| `{field}` | {rule.describe()} |" for field, rule in FIELDS.items()]
  return "\n".join(lines)
