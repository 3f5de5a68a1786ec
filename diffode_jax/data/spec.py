"""What a split is and what the config asks of it: ``ImageData``, the data-set names
``DATASETS``, the image shape of a config (``image_shape``), and the checks of a config
(``check_data_config``, before any data loads) and of loaded images (``check_images``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, overload

import numpy as np
import numpy.typing as npt

from diffode_jax.errors import DataError

if TYPE_CHECKING:
  import ml_collections

DATASETS = ("digits", "photo_patches", "cifar10", "imagenet32_old", "imagenet32_new",
            "image_folder", "tfds")

# select(n) -> the sorted distinct rows to load of a split of n images (None: all of them).
RowSelector: TypeAlias = Callable[[int], "np.ndarray | Sequence[int] | None"]


@dataclasses.dataclass(frozen=True)
class ImageData:
  """Integer images (N, H, W, C) of one split (``level_dtype``), with their name and version.

  ``images`` is an array, or a ``RowSubset`` when only some rows were loaded (a process of
  a multi-host evaluation holds only the rows its devices evaluate).
  """

  images: np.ndarray | RowSubset
  name: str
  split: str
  version: str

  def __len__(self) -> int:
    return self.images.shape[0]


class RowSubset:
  """The rows ``rows`` (sorted, distinct) of a split of ``total`` images, indexed like the
  whole split: ``x[i]`` / ``x[int array]`` for held rows, ``x[:n]`` for the first n images
  (still partial), ``len`` and ``shape`` of the whole. Indexing a row that is not held is
  an IndexError (a bug of whoever chose the rows, never of the data)."""

  def __init__(self, images: np.ndarray, rows: npt.ArrayLike, total: int) -> None:
    self.local = images
    self.rows = np.asarray(rows, np.int64)
    self.total = int(total)
    if len(self.rows) != len(images):
      raise ValueError(f"{len(self.rows)} row indices for {len(images)} images")
    if len(self.rows) and (np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0
                           or self.rows[-1] >= self.total):
      raise ValueError(f"row indices must be sorted, distinct and below {self.total}")

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.total,) + tuple(self.local.shape[1:])

  @property
  def dtype(self) -> np.dtype[Any]:
    return self.local.dtype

  def __len__(self) -> int:
    return self.total

  @overload
  def __getitem__(self, index: slice) -> RowSubset: ...

  @overload
  def __getitem__(self, index: int | np.integer[Any] | Sequence[int] | np.ndarray
                  ) -> np.ndarray: ...

  def __getitem__(self, index: slice | npt.ArrayLike) -> RowSubset | np.ndarray:
    if isinstance(index, slice):
      if index.start not in (None, 0) or index.step not in (None, 1):
        raise IndexError("RowSubset slices only as [:n]")
      n = min(self.total, self.total if index.stop is None else int(index.stop))
      keep = self.rows < n
      return RowSubset(self.local[keep], self.rows[keep], n)
    wanted = np.asarray(index, np.int64)
    held = np.isin(wanted, self.rows)
    if not np.all(held):
      raise IndexError(f"rows {np.unique(wanted[~held])[:8].tolist()} are not held here")
    return self.local[np.searchsorted(self.rows, wanted)]


def image_shape(config_data: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(height, width, channels): data.image_size high, data.image_width (default: square)."""
  width = config_data.get("image_width")  # absent from configs saved before it existed
  size = config_data.image_size
  return (size, size if width is None else width, config_data.channels)


def shape_fields(config_data: ml_collections.ConfigDict) -> str:
  """The config fields that make up ``image_shape``, for error messages."""
  return ("data.image_size, data.image_width, data.channels"
          if config_data.get("image_width") is not None else "data.image_size, data.channels")


def check_data_config(config_data: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a config.data value that cannot work (before any data loads)."""
  d = config_data
  if d.dataset not in DATASETS:
    raise ValueError(f"unknown data.dataset {d.dataset!r}; expected one of {DATASETS} (any "
                     f"tfds image data set: --config.data.dataset=tfds "
                     f"--config.data.tfds_name={d.dataset})")
  for name in ("image_size", "channels", "image_width"):
    value = d.get(name)
    if name == "image_width" and value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
  height, width, _ = image_shape(d)
  if d.get("augment") and height != width:
    raise ValueError(f"data.augment uses quarter turns, which need square images; got "
                     f"{height}x{width}")
  if not 0.0 <= d.holdout_fraction < 1.0:
    raise ValueError(f"data.holdout_fraction must be in [0, 1), got {d.holdout_fraction!r}")


def check_images(images: np.ndarray, config_data: ml_collections.ConfigDict, what: str) -> None:
  """Raises DataError unless images are (N, size, size, channels) integers below V."""
  want = image_shape(config_data)
  if images.ndim == 3 and images.shape == want:
    raise DataError(f"{what}: shape {images.shape} is one image; pass a batch (N,) + {want}, "
                    f"e.g. images[None]")
  if images.ndim != 4:
    raise DataError(f"{what}: an array of shape {images.shape}, where a batch (N,) + {want} "
                    f"is expected ({shape_fields(config_data)})")
  if images.shape[1:] != want:
    raise DataError(f"{what}: images have shape {images.shape[1:]}, the config expects "
                    f"{want} ({shape_fields(config_data)})")
  if images.shape[0] == 0:
    raise DataError(f"{what}: no images")
  top = int(images.max())
  if top >= config_data.num_levels:
    raise DataError(f"{what}: pixel value {top} does not fit data.num_levels="
                    f"{config_data.num_levels}")
