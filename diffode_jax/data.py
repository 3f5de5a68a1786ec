"""Integer image data sets as arrays of shape (N, H, W, C), and step-indexed batches.

Levels are stored as uint8 for V <= 256 and uint16 up to V = 65536 (``level_dtype``).

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
* ``imagenet32_old``: tfds ``downsampled_imagenet/32x32`` (train / validation), the
  ImageNet-32 of ScoreSDE and VDM.
* ``imagenet32_new``: the anti-aliased ``Imagenet32_{train,val}.zip`` release (Flow
  Matching, i-DODE's 3.43 bits/dim), prepared by the tfds builder in ``imagenet32_new.py``
  from ``config.data.manual_dir``.
* ``tfds``: any other tfds image data set, ``data.tfds_name`` (e.g. ``mnist``,
  ``fashion_mnist``, ``svhn_cropped``), splits ``data.tfds_train_split`` /
  ``data.tfds_test_split`` (any tfds split string, e.g. ``train[:90%]``), images under the
  feature ``data.tfds_image_key``.
* ``image_folder``: 8-bit PNG/JPEG or 16-bit PNG files of one size (and one bit depth)
  under ``config.data.folder``: either
  ``train/`` and ``test/`` subfolders, or one pool of which ``data.holdout_fraction`` is
  held out as test (chosen by a hash of each file's path, see ``is_held_out``). Files may
  sit in nested subfolders and are read in sorted order. Levels V = ``data.num_levels``,
  for files of b bits (8 or 16): with V = 2^b the pixel values are the levels; with
  V < 2^b the files must hold levels 0..V-1 directly (e.g. 5-bit data saved as values
  0..31, 12-bit data in 16-bit PNGs), or, with ``data.reduce_bits``, values p become
  floor(p V / 2^b) (Glow-style bit reduction).
  Grey images give 1 channel, RGB 3; palette images are expanded to RGB.

The tfds data sets are 8-bit; with V = ``data.num_levels`` < 256 and ``data.reduce_bits``
their values p become floor(p V / 256) as well (5-bit CIFAR-10: V = 32).

Every split is checked against the config (image size, channels, values below V) and
carries a version string (tfds builder and version, or a fingerprint of the folder's file
names and sizes) that reports repeat.

Batches are a pure function of (seed, step): the data order is a fresh permutation per
epoch, so a resumed run reads exactly the batches an uninterrupted run would, whatever the
number of hosts. Each host holds the array of the split (ImageNet-32 train: 3.9 GB)
and takes only its own contiguous slice of every global batch (``host_batch``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zlib

import numpy as np
from diffode_jax.errors import DataError  # noqa: F401  (re-exported)

DATASETS = ("digits", "photo_patches", "cifar10", "imagenet32_old", "imagenet32_new",
            "image_folder", "tfds")
_TFDS = {
    "cifar10": ("cifar10", {"train": "train", "test": "test"}),
    "imagenet32_old": ("downsampled_imagenet/32x32", {"train": "train", "test": "validation"}),
    "imagenet32_new": ("imagenet32_new", {"train": "train", "test": "validation"}),
}
DIGITS_TRAIN_SIZE = 1437
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")




@dataclasses.dataclass(frozen=True)
class ImageData:
  """Integer images (N, H, W, C) of one split (``level_dtype``), with their name and version."""

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


def _tfds(name: str, config_data, split: str) -> tuple[np.ndarray, str]:
  """All images of a tfds split as one uint8 array (N, H, W, C), and '<builder>:<version>'."""
  import tensorflow_datasets as tfds

  if name == "tfds":
    if not config_data.get("tfds_name"):
      raise DataError("data.dataset=tfds needs --config.data.tfds_name=<tfds name>, e.g. mnist")
    builder_name = config_data.tfds_name
    splits = {"train": config_data.tfds_train_split, "test": config_data.tfds_test_split}
    image_key = config_data.tfds_image_key
  else:
    (builder_name, splits), image_key = _TFDS[name], "image"
  try:
    if name == "imagenet32_new":
      builder = _imagenet32_new_builder(config_data)
    else:
      builder = tfds.builder(builder_name, data_dir=config_data.tfds_data_dir)
      builder.download_and_prepare()
    ds = builder.as_dataset(split=splits[split], shuffle_files=False)
    if image_key not in builder.info.features:
      raise DataError(f"tfds data set {builder_name!r} has no feature {image_key!r} (set "
                      f"data.tfds_image_key); it has {sorted(builder.info.features)}")
    chunks = [np.asarray(b[image_key]) for b in tfds.as_numpy(ds.batch(1024))]
  except DataError:
    raise
  except Exception as e:  # tfds' many failure types (download, missing files, decoding)
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise DataError(f"cannot load tfds data set {builder_name!r} split {splits[split]!r}: "
                    f"{type(e).__name__}: {first}") from None
  if not chunks:
    raise DataError(f"tfds data set {builder_name!r} split {splits[split]!r} is empty")
  images = np.concatenate(chunks)
  if images.ndim == 3:  # a feature without a channel axis
    images = images[..., None]
  if images.dtype not in (np.uint8, np.uint16):
    raise DataError(f"tfds data set {builder_name!r}: feature {image_key!r} holds "
                    f"{images.dtype} values, not 8- or 16-bit unsigned integers")
  images, suffix = _as_levels(images, config_data,
                             f"tfds data set {builder_name!r} split {splits[split]!r}",
                             "the data set")
  return images, f"{builder_name}:{builder.info.version}" + suffix


def _imagenet32_new_builder(config_data):
  """The prepared imagenet32_new builder; prepares it from data.manual_dir the first time."""
  import tensorflow_datasets as tfds

  from diffode_jax import imagenet32_new

  builder = imagenet32_new.Imagenet32New(data_dir=config_data.tfds_data_dir)
  if not builder.is_prepared():
    manual_dir = config_data.manual_dir
    if not manual_dir:
      raise DataError("data.dataset=imagenet32_new needs --config.data.manual_dir=<dir with "
                      f"{imagenet32_new.TRAIN_ZIP} and {imagenet32_new.VAL_ZIP}>")
    missing = imagenet32_new.missing_files(manual_dir)
    if missing:
      raise DataError(f"data.manual_dir={manual_dir!r} lacks {', '.join(missing)} "
                      "(ImageNet-32 new version, https://image-net.org/download-images.php)")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _folder_files(folder: str) -> list[str]:
  """Image files under folder (recursively), as sorted paths relative to folder."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    for n in filenames:
      if n.lower().endswith(_IMAGE_SUFFIXES) and not n.startswith("."):
        found.append(os.path.relpath(os.path.join(dirpath, n), folder))
  return sorted(found)


def is_held_out(relative_path: str, fraction: float) -> bool:
  """Whether a file of a single-pool image folder belongs to the test split.

  Decided by a hash of the file's relative path, so adding or removing other files never
  moves a file between the splits (the test split is about ``fraction`` of the files).
  """
  return zlib.crc32(relative_path.encode("utf-8")) < fraction * 2**32


def _png_bit_depth(path: str) -> int:
  """The bit depth in a PNG file's IHDR chunk (0 if the file is not a readable PNG)."""
  try:
    with open(path, "rb") as f:
      head = f.read(26)
  except OSError:
    return 0  # the reader below reports it
  if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    return 0
  return head[24]


def _read_png16(path: str) -> np.ndarray:
  """A 16-bit PNG as (H, W, C) uint16 (Pillow would read 16-bit RGB as 8-bit, silently)."""
  import tensorflow as tf

  with open(path, "rb") as f:
    contents = f.read()
  try:
    return tf.io.decode_png(contents, dtype=tf.uint16).numpy()
  except tf.errors.OpError as e:
    raise DataError(f"cannot read image {path!r}: {e.message}") from None


def _read_image(path: str) -> np.ndarray:
  """One image file as (H, W, C) uint8, or uint16 for a 16-bit PNG."""
  from PIL import Image

  if _png_bit_depth(path) == 16:
    return _read_png16(path)
  try:
    with Image.open(path) as img:
      if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
      elif img.mode == "1":
        img = img.convert("L")
      arr = np.asarray(img)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot read image {path!r}: {e}") from None
  if arr.dtype != np.uint8:
    raise DataError(f"image {path!r} has {arr.dtype} pixels; only 8-bit PNG/JPEG and 16-bit "
                    "PNG files are supported")
  return arr[..., None] if arr.ndim == 2 else arr


def _image_folder(config_data, split: str) -> tuple[np.ndarray, str]:
  """Images of one split of an image folder, and a version string naming its contents."""
  root = config_data.folder
  if not root:
    raise DataError("data.dataset=image_folder needs --config.data.folder=<dir>")
  if not os.path.isdir(root):
    raise DataError(f"image folder {root!r} does not exist")
  if os.path.isdir(os.path.join(root, "train")):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
      raise DataError(f"image folder {root!r} has train/ but no {split}/ subfolder")
    files = _folder_files(folder)
  else:
    folder = root
    fraction = float(config_data.holdout_fraction)
    if split == "test" and fraction <= 0:
      raise DataError(f"image folder {root!r} has no train/ and test/ subfolders; set "
                      "--config.data.holdout_fraction to hold out part of it as test")
    files = [f for f in _folder_files(root) if is_held_out(f, fraction) == (split == "test")]
  if not files:
    raise DataError(f"image folder {folder!r} holds no PNG or JPEG images for split {split!r}")

  want = image_shape(config_data)
  images = None
  fingerprint = hashlib.sha1()
  for i, rel in enumerate(files):
    path = os.path.join(folder, rel)
    arr = _read_image(path)
    if arr.shape != want:
      raise DataError(f"image {path!r} has shape {arr.shape}, the config expects {want} "
                      f"({_shape_fields(config_data)})")
    if images is None:
      images = np.empty((len(files),) + want, arr.dtype)
    elif arr.dtype != images.dtype:
      raise DataError(f"image folder {folder!r} mixes bit depths: {path!r} has "
                      f"{8 * arr.dtype.itemsize}-bit pixels, {files[0]!r} "
                      f"{8 * images.dtype.itemsize}-bit")
    images[i] = arr
    fingerprint.update(f"{rel}\0{os.path.getsize(path)}\0".encode())
  images, suffix = _as_levels(images, config_data, f"image folder {folder!r}", "the files")
  version = f"folder:{len(files)}files:sha1-{fingerprint.hexdigest()[:12]}" + suffix
  return images, version


def _as_levels(images: np.ndarray, config_data, what: str, holder: str):
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
      wide = np.uint16 if bits == 8 else np.uint32  # p * V < 2^(2b); not 8x the memory
      images = images.astype(wide) * wide(v) // full
      suffix += f":reduced-to-{v}"
    elif int(images.max()) >= v:
      raise DataError(
          f"{what}: pixel value {int(images.max())} does not fit data.num_levels={v}; "
          f"{holder} must hold levels 0..{v - 1}, or set --config.data.reduce_bits=True "
          f"to map {bits}-bit values p to floor(p * {v} / {full})")
  return images.astype(level_dtype(v)), suffix


def level_dtype(num_levels: int):
  """The smallest unsigned integer type that holds levels 0..V-1 (uint8 up to V = 256)."""
  if num_levels <= 256:
    return np.uint8
  if num_levels <= 65536:
    return np.uint16
  return np.uint32


def image_shape(config_data) -> tuple[int, int, int]:
  """(height, width, channels): data.image_size high, data.image_width (default: square)."""
  width = config_data.get("image_width")  # absent from configs saved before it existed
  size = config_data.image_size
  return (size, size if width is None else width, config_data.channels)


def _shape_fields(config_data) -> str:
  return ("data.image_size, data.image_width, data.channels"
          if config_data.get("image_width") is not None else "data.image_size, data.channels")


def check_data_config(config_data) -> None:
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


def load_split(config_data, split: str) -> ImageData:
  """Loads one split ('train' or 'test') and checks it against the config."""
  name = config_data.dataset
  if split not in ("train", "test"):
    raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
  if name == "digits":
    images, version = _digits(split), "sklearn-digits:split-rng0-1437"
  elif name == "photo_patches":
    images, version = _photo_patches(split), "sklearn-sample-images:8x8-left75"
  elif name in _TFDS or name == "tfds":
    images, version = _tfds(name, config_data, split)
  elif name == "image_folder":
    images, version = _image_folder(config_data, split)
  else:
    raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
  check_images(images, config_data, f"{name}/{split}")
  return ImageData(images, name, split, version)


def check_images(images: np.ndarray, config_data, what: str) -> None:
  """Raises DataError unless images are (N, size, size, channels) integers below V."""
  want = image_shape(config_data)
  if images.ndim != 4 or images.shape[1:] != want:
    raise DataError(f"{what}: images have shape {images.shape[1:]}, the config expects "
                    f"{want} ({_shape_fields(config_data)})")
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
    perm = epoch_permutation(num_examples, seed, int(epoch))
    mask = epochs == epoch
    out[mask] = perm[positions[mask]]
  return out


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The data order of one epoch (cached: a permutation of 1.28M indices takes ~30 ms)."""
  perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def host_batch(data: ImageData, batch_size: int, step: int, seed: int,
               process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This host's slice of the global batch of ``step``."""
  idx = batch_indices(len(data), batch_size, step, seed)
  per_host = batch_size // process_count
  return data.images[idx[process_index * per_host:(process_index + 1) * per_host]]
