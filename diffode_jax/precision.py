"""Matmul and convolution precision of float32 computations (``jax.default_matmul_precision``).

By default XLA may run float32 matrix products and convolutions at reduced internal
precision: TF32 on NVIDIA A100 / H100 (10 mantissa bits), a single bfloat16 pass on TPU
(8 bits): a relative error of about 1e-3 per product, far above the ODE solver's rtol of
1e-5. CPUs compute float32 products in float32 whatever the setting.

* ``default``: leave it to JAX / XLA (and to ``JAX_DEFAULT_MATMUL_PRECISION`` if set);
* ``high``: bfloat16_3x on TPU, TF32 on GPUs;
* ``highest``: full float32 products (6 bfloat16 passes on TPU, no TF32 on GPUs).

``config.eval.precision`` (default ``highest``) covers the likelihood ODE, its divergence
and sampling; ``config.training.precision`` (default ``default``) the train step. The
setting acts when a function is traced, so ``traced_with`` puts it inside the traced
function: a jitted function built from it carries its precision in every compiled
version, whoever calls it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax

PRECISIONS = ("default", "high", "highest")
DEFAULT_EVAL_PRECISION = "highest"
DEFAULT_TRAIN_PRECISION = "default"

_F = TypeVar("_F", bound=Callable[..., Any])


def check(precision: str, what: str) -> None:
  """Raises ValueError unless precision is one of PRECISIONS."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown {what} {precision!r}; expected one of {PRECISIONS}")


def scope(precision: str) -> contextlib.AbstractContextManager[Any]:
  """A context in which JAX traces matrix products and convolutions at ``precision``."""
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def traced_with(precision: str, fn: _F) -> _F:
  """fn, traced at ``precision`` (wrap before ``jax.jit``)."""
  if precision == "default":
    return fn

  @functools.wraps(fn)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    with scope(precision):
      return fn(*args, **kwargs)

  return cast(_F, wrapped)  # functools.wraps keeps fn's signature
