"""Which rows of an image set each device holds: a batch placed over a mesh of devices,
padded to a multiple of the device count with copies of its last row (``place_batch``),
and the rows a process of a multi-host evaluation must load (``process_rows``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffode_jax import parallel


def padded_rows(lo: int, hi: int, mesh: jax.sharding.Mesh) -> np.ndarray:
  """The indices lo..hi-1, then copies of hi - 1 up to a multiple of the mesh's size."""
  rows = np.arange(lo, hi)
  padded = parallel.padded_size(len(rows), mesh)
  return np.concatenate([rows, np.full(padded - len(rows), hi - 1, rows.dtype)])


def place_batch(images: Any, lo: int, hi: int,
                mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, int | None]:
  """(batch, num_real) of images[lo:hi] for a log_prob function over mesh.

  Without a mesh of several devices: the rows as a device array, num_real None. With
  one: a global array over the mesh, padded (``padded_rows``), each process reading only
  its own devices' rows, and num_real = hi - lo.
  """
  if mesh is None or mesh.size == 1:
    return jnp.asarray(images[lo:hi]), None
  return parallel.place_rows(images, padded_rows(lo, hi, mesh), mesh), hi - lo


def process_rows(num_images: int, batch_size: int, mesh: jax.sharding.Mesh) -> np.ndarray:
  """The sorted distinct indices of images[:num_images] that this process's devices read
  over a whole ``evaluation.evaluate_batches`` loop (``place_batch``'s layout): what a
  process of a multi-host evaluation needs to load."""
  sharding = parallel.batch_sharding(mesh)
  held = []
  for lo in range(0, num_images, batch_size):
    rows = padded_rows(lo, min(lo + batch_size, num_images), mesh)
    for index in sharding.addressable_devices_indices_map((len(rows),)).values():
      held.append(rows[index[0]])  # type: ignore[index]  # always a tuple of slices for an array
  return np.unique(np.concatenate(held)) if held else np.zeros(0, np.int64)
