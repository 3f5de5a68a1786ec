"""``dataset=image_folder``: image files (8-bit PNG/JPEG, 16-bit PNG) under ``data.folder``.

The files must be of one size (and one bit depth), either in ``train/`` and ``test/``
subfolders, or in one pool of which ``data.holdout_fraction`` is held out as test (chosen
by a hash of each file's path, see ``is_held_out``). Files may sit in nested subfolders
and are read in sorted order. Levels V = ``data.num_levels``, for files of b bits (8 or
16): with V = 2^b the pixel values are the levels; with V < 2^b the files must hold levels
0..V-1 directly (e.g. 5-bit data saved as values 0..31, 12-bit data in 16-bit PNGs), or,
with ``data.reduce_bits``, values p become floor(p V / 2^b) (Glow-style bit reduction;
``levels.as_levels``). Grey images give 1 channel, RGB 3; palette images are expanded to
RGB. The version string is a fingerprint of the folder's file names and sizes. The folder
may be local or in a bucket (``gs://``, through ``diffode_jax.storage``).
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

import numpy as np

from diffode_jax import storage
from diffode_jax.data.levels import as_levels
from diffode_jax.data.spec import RowSelector, RowSubset, image_shape, shape_fields
from diffode_jax.errors import DataError

if TYPE_CHECKING:
  import ml_collections

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def folder_files(folder: str) -> list[str]:
  """Image files under folder (recursively), as sorted '/'-separated paths relative to
  folder."""
  return [f for f in storage.walk_files(folder)
          if f.lower().endswith(_IMAGE_SUFFIXES) and not f.rsplit("/", 1)[-1].startswith(".")]


def is_held_out(relative_path: str, fraction: float) -> bool:
  """Whether a file of a single-pool image folder belongs to the test split.

  Decided by a hash of the file's relative path, so adding or removing other files never
  moves a file between the splits (the test split is about ``fraction`` of the files).
  """
  return zlib.crc32(relative_path.encode("utf-8")) < fraction * 2**32


def _png_bit_depth(head: bytes) -> int:
  """The bit depth in a PNG file's IHDR chunk (0 if the bytes are not a readable PNG)."""
  if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    return 0
  return head[24]


def _read_png16(contents: bytes, path: str) -> np.ndarray:
  """A 16-bit PNG as (H, W, C) uint16 (Pillow would read 16-bit RGB as 8-bit, silently)."""
  import tensorflow as tf

  try:
    return tf.io.decode_png(contents, dtype=tf.uint16).numpy()
  except tf.errors.OpError as e:
    raise DataError(f"cannot read image {path!r}: {e.message}") from None


def read_image(path: str, contents: bytes | None = None) -> np.ndarray:
  """One image file (its bytes, if already read) as (H, W, C) uint8, or uint16 for a
  16-bit PNG."""
  from PIL import Image

  if contents is None:
    contents = _read_bytes(path)
  if _png_bit_depth(contents[:26]) == 16:
    return _read_png16(contents, path)
  try:
    with Image.open(io.BytesIO(contents)) as opened:
      img: Image.Image = opened
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


def _read_bytes(path: str) -> bytes:
  try:
    return storage.read_bytes(path)
  except OSError as e:
    raise DataError(f"cannot read image {path!r}: {storage.describe(e)}") from None


def _read_all(paths: list[str]) -> Iterator[bytes]:
  """The bytes of every file, in order; a bucket's objects are fetched 16 at a time."""
  if paths and storage.is_remote(paths[0]):
    with futures.ThreadPoolExecutor(16) as pool:
      yield from pool.map(_read_bytes, paths)
  else:
    yield from map(_read_bytes, paths)


def load(config_data: ml_collections.ConfigDict, split: str, select: RowSelector | None = None
         ) -> tuple[np.ndarray | RowSubset, str]:
  """Images of one split of an image folder, and a version string naming its contents
  (file names and sizes). With ``select``: a ``RowSubset`` of the files ``select(N)``
  returns, the only ones read (the others' sizes come from a listing)."""
  root = config_data.folder
  if not root:
    raise DataError("data.dataset=image_folder needs --config.data.folder=<dir>")
  problem = storage.unsupported(root) or storage.check_bucket(root)
  if problem:
    raise DataError(f"image folder {root!r}: {problem}")
  try:
    return _load(config_data, root, split, select)
  except OSError as e:  # listing a folder (a bucket's error arrives as OSError)
    raise DataError(f"image folder {root!r}: {storage.describe(e)}") from None


def _load(config_data: ml_collections.ConfigDict, root: str, split: str,
          select: RowSelector | None = None) -> tuple[np.ndarray | RowSubset, str]:
  if not storage.isdir(root):
    raise DataError(f"image folder {root!r} does not exist")
  if storage.isdir(storage.join(root, "train")):
    folder = storage.join(root, split)
    if not storage.isdir(folder):
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
  paths = [storage.join(folder, rel) for rel in files]
  rows = None if select is None else select(len(files))
  chosen = range(len(files)) if rows is None else [int(r) for r in rows]
  sizes = {} if rows is None else {i: storage.size(paths[i]) for i in range(len(files))}
  images: np.ndarray | None = None
  for i, (row, contents) in enumerate(zip(chosen, _read_all([paths[r] for r in chosen]))):
    path = paths[row]
    arr = read_image(path, contents)
    if arr.shape != want:
      raise DataError(f"image {path!r} has shape {arr.shape}, the config expects {want} "
                      f"({shape_fields(config_data)})")
    if images is None:
      images = np.empty((len(chosen),) + want, arr.dtype)
    elif arr.dtype != images.dtype:
      raise DataError(f"image folder {folder!r} mixes bit depths: {path!r} has "
                      f"{8 * arr.dtype.itemsize}-bit pixels, {files[chosen[0]]!r} "
                      f"{8 * images.dtype.itemsize}-bit")
    images[i] = arr
    sizes[row] = len(contents)
  if images is None:  # this process holds none of the files
    images = np.zeros((0,) + want, _listed_dtype(paths[0]))
  fingerprint = hashlib.sha1()
  for i, rel in enumerate(files):
    fingerprint.update(f"{rel}\0{sizes[i]}\0".encode())
  images, suffix = as_levels(images, config_data, f"image folder {folder!r}", "the files")
  version = f"folder:{len(files)}files:sha1-{fingerprint.hexdigest()[:12]}" + suffix
  out: np.ndarray | RowSubset = images
  if rows is not None:
    out = RowSubset(images, rows, len(files))
  return out, version


def _listed_dtype(path: str) -> np.dtype[Any]:
  """The pixel dtype of the first file (for an empty share of a split)."""
  return read_image(path, _read_bytes(path)).dtype
