"""Integer image data sets as arrays of shape (N, H, W, C), and step-indexed batches.

Levels are stored as uint8 for V <= 256 and uint16 up to V = 65536 (``level_dtype``).
Scaling to (-1, 1) and dequantization happen in JAX (``dequantization.py``); this package
only loads, validates and orders integers.

Data sets (``config.data.dataset``), one submodule per source:

* ``digits``, ``photo_patches``: bundled with scikit-learn (``embedded.py``; ``digits`` is
  the embedded default with the fixed 1437 / 360 split).
* ``cifar10``, ``imagenet32_old``, ``imagenet32_new``, ``tfds`` (any tfds image data set by
  name): through tensorflow-datasets (``tfds_sets.py``; the ``imagenet32_new`` builder over
  the official zips is ``imagenet32_new.py``).
* ``image_folder``: 8-bit PNG/JPEG or 16-bit PNG files under ``data.folder``, in
  ``train/`` and ``test/`` or one pool with a hashed hold-out (``image_folder.py``).

The level mapping and bit reduction are in ``levels.py``, the checks against the config
(image size, channels, values below V) in ``spec.py``, and the batches in ``batching.py``.
Every split carries a version string (tfds builder and version, or a fingerprint of the
folder's file names and sizes) that reports repeat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffode_jax.data import embedded, image_folder, tfds_sets
from diffode_jax.data.batching import batch_indices, epoch_permutation, host_batch
from diffode_jax.data.embedded import DIGITS_TRAIN_SIZE
from diffode_jax.data.image_folder import is_held_out
from diffode_jax.data.levels import level_dtype
import numpy as np

from diffode_jax.data.spec import (DATASETS, ImageData, RowSelector, RowSubset,
                                   check_data_config, check_images, image_shape)
from diffode_jax.errors import DataError

if TYPE_CHECKING:
  import ml_collections

__all__ = ["DataError", "ImageData", "RowSubset", "DATASETS", "DIGITS_TRAIN_SIZE", "load_split",
           "check_images", "check_data_config", "image_shape", "level_dtype", "host_batch",
           "batch_indices", "epoch_permutation", "is_held_out"]


def load_split(config_data: ml_collections.ConfigDict, split: str,
               select: RowSelector | None = None) -> ImageData:
  """Loads one split ('train' or 'test') and checks it against the config.

  ``select(n)``, given the split's image count n, may return the sorted distinct row
  indices to load (None: all): the split's images are then a ``RowSubset`` holding only
  those, read and decoded alone where the source allows (tfds records are filtered
  before decoding, an image folder reads only those files; the version string is the
  same as a whole load's).
  """
  name = config_data.dataset
  if split not in ("train", "test"):
    raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
  select = select or (lambda n: None)
  images: np.ndarray | RowSubset
  if name in embedded.NAMES:
    images, version = embedded.load(name, split)
    rows = select(len(images))
    if rows is not None:
      images = RowSubset(images[np.asarray(rows, np.int64)], rows, len(images))
  elif name in tfds_sets.NAMES:
    images, version = tfds_sets.load(name, config_data, split, select)
  elif name == "image_folder":
    images, version = image_folder.load(config_data, split, select)
  else:
    raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
  if not isinstance(images, RowSubset):
    check_images(images, config_data, f"{name}/{split}")
  elif images.total == 0:
    raise DataError(f"{name}/{split}: no images")
  elif len(images.local):  # a process may hold none of a small split
    check_images(images.local, config_data, f"{name}/{split}")
  return ImageData(images, name, split, version)
