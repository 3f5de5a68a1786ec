"""The data sets bundled with scikit-learn (no download): ``digits`` and ``photo_patches``.

* ``digits`` (the embedded default): scikit-learn's 8x8 digits, 17 levels (0..16).
  Split fixed for comparisons: train = the first 1437 images of
  ``numpy.random.default_rng(0).permutation(1797)``, test = the other 360.
* ``photo_patches``: the non-overlapping 8x8 RGB tiles of scikit-learn's two bundled
  sample photos; train = tiles inside the left 75% of each photo's width, test = tiles
  inside the right 25%. 8-bit.
"""

from __future__ import annotations

import numpy as np

NAMES = ("digits", "photo_patches")
DIGITS_TRAIN_SIZE = 1437
_VERSIONS = {"digits": "sklearn-digits:split-rng0-1437",
             "photo_patches": "sklearn-sample-images:8x8-left75"}


def digits(split: str) -> np.ndarray:
  from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

  images = load_digits().images.astype(np.uint8)[..., None]
  order = np.random.default_rng(0).permutation(images.shape[0])
  idx = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
  return images[idx]


def photo_patches(split: str, tile: int = 8) -> np.ndarray:
  from sklearn.datasets import load_sample_images  # bundled with scikit-learn

  tiles = []
  for photo in load_sample_images().images:
    height, width = photo.shape[:2]
    cut = int(0.75 * width)
    lo, hi = (0, cut) if split == "train" else (cut, width)
    first = -(-lo // tile) * tile  # first tile boundary inside the region
    for top in range(0, height - tile + 1, tile):
      for left in range(first, hi - tile + 1, tile):
        tiles.append(photo[top:top + tile, left:left + tile])
  return np.stack(tiles).astype(np.uint8)


def load(name: str, split: str) -> tuple[np.ndarray, str]:
  """The uint8 images of one split of an embedded data set, and its version string."""
  images = digits(split) if name == "digits" else photo_patches(split)
  return images, _VERSIONS[name]
