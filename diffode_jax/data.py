"""Integer image data sets as uint8 arrays of shape (N, H, W, C), and step-indexed batches.

Scaling to (-1, 1) and dequantization happen in JAX (``dequantization.py``); this module
only loads, validates and orders integers.

Data sets (``config.data.dataset``):

* ``digits`` (embedded default): scikit-learn's bundled 8x8 digits, 17 levels (0..16).
  Split fixed for comparisons: train = the first 1437 images of
  ``numpy.random.default_rng(0).permutation(1797)``, test = the other 360.
* ``photo_patches``: the non-overlapping 8x8 RGB tiles of scikit-learn's two bundled
  sample photos; train = tiles inside the left 75% of each photo's width, test = tiles
  inside the right 25%. 8-bit.
* ``cifar10``: tfds ``cifar10`` (train / test).
* ``imagenet32_old``: tfds ``downsampled_imagenet/32x32`` (train / validation).
* ``image_folder``: PNG/JPEG files under ``config.data.folder``/train and /test.

Batches are a pure function of (seed, step): the data order is a fresh permutation per
epoch, so a resumed run reads exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

DATASETS = ("digits", "photo_patches", "cifar10", "imagenet32_old", "image_folder")
_TFDS = {
    "cifar10": ("cifar10", {"train": "train", "test": "test"}),
    "imagenet32_old": ("downsampled_imagenet/32x32", {"train": "train", "test": "validation"}),
}
DIGITS_TRAIN_SIZE = 1437
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
  """Bad or missing data; the message is shown to the user as one line."""


@dataclasses.dataclass(frozen=True)
class ImageData:
  """uint8 images (N, H, W, C) of one split, with the name and version they came from."""

  images: np.ndarray
  name: str
  split: str
  version: str

  def __len__(self):
    return self.images.shape[0]


def _digits(split: str) -> np.ndarray:
  from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

  images = load_digits().images.astype(np.uint8)[..., None]
  order = np.random.default_rng(0).permutation(images.shape[0])
  idx = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
  return images[idx]


def _photo_patches(split: str, tile: int = 8) -> np.ndarray:
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


def _tfds(name: str, split: str, data_dir) -> tuple[np.ndarray, str]:
  import tensorflow_datasets as tfds

  builder_name, splits = _TFDS[name]
  ds, info = tfds.load(builder_name, split=splits[split], data_dir=data_dir, with_info=True,
                       shuffle_files=False)
  chunks = [np.asarray(b["image"]) for b in tfds.as_numpy(ds.batch(1024))]
  if not chunks:
    raise DataError(f"tfds data set {builder_name!r} split {splits[split]!r} is empty")
  return np.concatenate(chunks).astype(np.uint8), f"{builder_name}:{info.version}"


def _image_folder(root, split: str) -> np.ndarray:
  from PIL import Image

  if not root:
    raise DataError("data.dataset=image_folder needs --config.data.folder=<dir>")
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise DataError(f"image folder {folder!r} does not exist")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_SUFFIXES))
  if not names:
    raise DataError(f"image folder {folder!r} holds no PNG or JPEG images")
  images = []
  for n in names:
    path = os.path.join(folder, n)
    try:
      with Image.open(path) as img:
        arr = np.asarray(img)
    except OSError as e:
      raise DataError(f"cannot read image {path!r}: {e}") from None
    images.append(arr[..., None] if arr.ndim == 2 else arr)
  shapes = {a.shape for a in images}
  if len(shapes) != 1:
    raise DataError(f"images in {folder!r} differ in size: {sorted(shapes)[:3]}")
  return np.stack(images)


def load_split(config_data, split: str) -> ImageData:
  """Loads one split ('train' or 'test') and checks it against the config."""
  name = config_data.dataset
  if split not in ("train", "test"):
    raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
  if name == "digits":
    images, version = _digits(split), "sklearn-digits:split-rng0-1437"
  elif name == "photo_patches":
    images, version = _photo_patches(split), "sklearn-sample-images:8x8-left75"
  elif name in _TFDS:
    images, version = _tfds(name, split, config_data.tfds_data_dir)
  elif name == "image_folder":
    images, version = _image_folder(config_data.folder, split), "folder"
  else:
    raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
  check_images(images, config_data, f"{name}/{split}")
  return ImageData(images, name, split, version)


def check_images(images: np.ndarray, config_data, what: str) -> None:
  """Raises DataError unless images are (N, size, size, channels) integers below V."""
  want = (config_data.image_size, config_data.image_size, config_data.channels)
  if images.ndim != 4 or images.shape[1:] != want:
    raise DataError(f"{what}: images have shape {images.shape[1:]}, the config expects "
                    f"{want} (data.image_size, data.channels)")
  if images.shape[0] == 0:
    raise DataError(f"{what}: no images")
  top = int(images.max())
  if top >= config_data.num_levels:
    raise DataError(f"{what}: pixel value {top} does not fit data.num_levels="
                    f"{config_data.num_levels}")


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the global batch of ``step``: epochs are fresh permutations of the data."""
  flat = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, positions = np.divmod(flat, num_examples)
  out = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng((seed, int(epoch))).permutation(num_examples)
    mask = epochs == epoch
    out[mask] = perm[positions[mask]]
  return out


def host_batch(data: ImageData, batch_size: int, step: int, seed: int,
               process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This host's slice of the global batch of ``step`` (uint8)."""
  idx = batch_indices(len(data), batch_size, step, seed)
  per_host = batch_size // process_count
  return data.images[idx[process_index * per_host:(process_index + 1) * per_host]]
