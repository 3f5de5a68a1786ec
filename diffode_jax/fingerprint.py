"""Content fingerprints: what proves that stored per-image rows belong to a model and images.

A resumed evaluation keeps earlier rows only if its header matches, and the header names
the model and the images by these fingerprints: a sha256 of every parameter's bytes (with
its path, shape and dtype) and of the evaluated images. A retrained model at the same step,
another checkpoint under the same step number, or edited images all change them, so their
rows are recomputed instead of reused. Hashing reads each array once, far cheaper than one
ODE solve of the same images.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, cast

import jax
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
  from diffode_jax.data.spec import RowSubset

DIGITS = 16  # hex digits kept: 64 bits, far from any accidental collision


def _host_copy(leaf: Any) -> np.ndarray:
  """This process's copy of a (replicated) array, without gathering across processes."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.asarray(leaf)


def _update(digest: hashlib._Hash, array: np.ndarray) -> None:
  array = np.ascontiguousarray(array)
  digest.update(f"{array.dtype.str}{array.shape}".encode())
  digest.update(array.tobytes())


def params_fingerprint(params: Any) -> str:
  """Hex digest of a parameter tree: its structure, and every leaf's dtype, shape, bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    _update(digest, _host_copy(leaf))
  return digest.hexdigest()[:DIGITS]


def images_fingerprint(images: npt.ArrayLike | RowSubset, chunk: int = 1024) -> str:
  """Hex digest of integer images (N, H, W, C) by value: the same pixels give the same
  digest whatever the integer dtype (uint8 from a loader, int64 from numpy). For the rows
  one process of several loaded (``data.RowSubset``) it covers those rows and the count."""
  digest = hashlib.sha256()
  local = getattr(images, "local", None)
  if local is not None:
    digest.update(f"rows of {len(cast('RowSubset', images))}".encode())
    images = local
  array = np.asarray(images)
  digest.update(f"{array.shape}".encode())
  for start in range(0, len(array), chunk):
    digest.update(np.ascontiguousarray(array[start:start + chunk], np.uint32).tobytes())
  return digest.hexdigest()[:DIGITS]
