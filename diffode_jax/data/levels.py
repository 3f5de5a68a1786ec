"""Levels: the integer dtype of levels 0..V-1 (``level_dtype``) and the mapping of b-bit
pixel values to levels (``as_levels``: values used as they are, or Glow-style bit reduction).

Levels are stored as uint8 for V <= 256, uint16 up to V = 65536 and uint32 beyond
(``level_dtype``, the one rule for that dtype). For files or tfds features of b bits
(8 or 16) and V = ``data.num_levels``: with V = 2^b the pixel values are the levels; with
V < 2^b the values must already be levels 0..V-1 (e.g. 5-bit data saved as values 0..31,
12-bit data in 16-bit PNGs), or, with ``data.reduce_bits``, values p become
floor(p V / 2^b) (5-bit CIFAR-10: V = 32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from diffode_jax.errors import DataError

if TYPE_CHECKING:
  import ml_collections


def level_dtype(num_levels: int) -> type[np.unsignedinteger[Any]]:
  """The smallest unsigned integer type that holds levels 0..V-1 (uint8 up to V = 256)."""
  if num_levels <= 256:
    return np.uint8
  if num_levels <= 65536:
    return np.uint16
  return np.uint32


def as_levels(images: np.ndarray, config_data: ml_collections.ConfigDict, what: str,
              holder: str) -> tuple[np.ndarray, str]:
  """b-bit unsigned images (b from the dtype) as levels 0..V-1, and a version suffix.

  With V = 2^b the values are the levels; with V < 2^b they must already be below V, or
  ``data.reduce_bits`` maps p to floor(p V / 2^b).
  """
  bits = 8 * images.dtype.itemsize
  full = 2**bits
  v = config_data.num_levels
  if v > full:
    raise DataError(f"{what} holds {bits}-bit images, data.num_levels={v} > {full}")
  suffix = f":{bits}bit" if bits != 8 else ""
  if v < full:
    if config_data.reduce_bits:
      # p * V < 2^(2b); not 8x the memory
      wide: type[np.unsignedinteger[Any]] = np.uint16 if bits == 8 else np.uint32
      images = images.astype(wide) * wide(v) // full
      suffix += f":reduced-to-{v}"
    elif images.size and int(images.max()) >= v:
      raise DataError(
          f"{what}: pixel value {int(images.max())} does not fit data.num_levels={v}; "
          f"{holder} must hold levels 0..{v - 1}, or set --config.data.reduce_bits=True "
          f"to map {bits}-bit values p to floor(p * {v} / {full})")
  return images.astype(level_dtype(v)), suffix
