"""``dataset=image_folder``: image files (8-bit PNG/JPEG, 16-bit PNG) under ``data.folder``.

The files must be of one size (and one bit depth), either in ``train/`` and ``test/``
subfolders, or in one pool of which ``data.holdout_fraction`` is held out as test (chosen
by a hash of each file's path, see ``is_held_out``). Files may sit in nested subfolders
and are read in sorted order. Levels V = ``data.num_levels``, for files of b bits (8 or
16): with V = 2^b the pixel values are the levels; with V < 2^b the files must hold levels
0..V-1 directly (e.g. 5-bit data saved as values 0..31, 12-bit data in 16-bit PNGs), or,
with ``data.reduce_bits``, values p become floor(p V / 2^b) (Glow-style bit reduction;
``levels.as_levels``). Grey images give 1 channel, RGB 3; palette images are expanded to
RGB. The version string is a fingerprint of the folder's file names and sizes.
"""

from __future__ import annotations

import hashlib
import os
import zlib

import numpy as np

from diffode_jax.data.levels import as_levels
from diffode_jax.data.spec import image_shape, shape_fields
from diffode_jax.errors import DataError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def folder_files(folder: str) -> list[str]:
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


def read_image(path: str) -> np.ndarray:
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


def load(config_data, split: str) -> tuple[np.ndarray, str]:
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
    files = folder_files(folder)
  else:
    folder = root
    fraction = float(config_data.holdout_fraction)
    if split == "test" and fraction <= 0:
      raise DataError(f"image folder {root!r} has no train/ and test/ subfolders; set "
                      "--config.data.holdout_fraction to hold out part of it as test")
    files = [f for f in folder_files(root) if is_held_out(f, fraction) == (split == "test")]
  if not files:
    raise DataError(f"image folder {folder!r} holds no PNG or JPEG images for split {split!r}")

  want = image_shape(config_data)
  images = None
  fingerprint = hashlib.sha1()
  for i, rel in enumerate(files):
    path = os.path.join(folder, rel)
    arr = read_image(path)
    if arr.shape != want:
      raise DataError(f"image {path!r} has shape {arr.shape}, the config expects {want} "
                      f"({shape_fields(config_data)})")
    if images is None:
      images = np.empty((len(files),) + want, arr.dtype)
    elif arr.dtype != images.dtype:
      raise DataError(f"image folder {folder!r} mixes bit depths: {path!r} has "
                      f"{8 * arr.dtype.itemsize}-bit pixels, {files[0]!r} "
                      f"{8 * images.dtype.itemsize}-bit")
    images[i] = arr
    fingerprint.update(f"{rel}\0{os.path.getsize(path)}\0".encode())
  images, suffix = as_levels(images, config_data, f"image folder {folder!r}", "the files")
  version = f"folder:{len(files)}files:sha1-{fingerprint.hexdigest()[:12]}" + suffix
  return images, version
