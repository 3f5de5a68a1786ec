"""The data sets loaded through tensorflow-datasets:

* ``cifar10``: tfds ``cifar10`` (train / test).
* ``imagenet32_old``: tfds ``downsampled_imagenet/32x32`` (train / validation), the
  ImageNet-32 of ScoreSDE and VDM.
* ``imagenet32_new``: the anti-aliased ``Imagenet32_{train,val}.zip`` release (Flow
  Matching, i-DODE's 3.43 bits/dim), prepared by the tfds builder in
  ``diffode_jax/data/imagenet32_new.py`` from ``config.data.manual_dir``.
* ``tfds``: any other tfds image data set, ``data.tfds_name`` (e.g. ``mnist``,
  ``fashion_mnist``, ``svhn_cropped``), splits ``data.tfds_train_split`` /
  ``data.tfds_test_split`` (any tfds split string, e.g. ``train[:90%]``), images under the
  feature ``data.tfds_image_key``.

The tfds data sets are 8-bit; with V = ``data.num_levels`` < 256 and ``data.reduce_bits``
their values p become floor(p V / 256) (``levels.as_levels``; 5-bit CIFAR-10: V = 32).
The version string is '<builder>:<version>'. tensorflow_datasets is imported only when a
split loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from diffode_jax.data.levels import as_levels
from diffode_jax.data.spec import RowSelector, RowSubset
from diffode_jax.errors import DataError, described

if TYPE_CHECKING:
  import ml_collections

BUILDERS = {
    "cifar10": ("cifar10", {"train": "train", "test": "test"}),
    "imagenet32_old": ("downsampled_imagenet/32x32", {"train": "train", "test": "validation"}),
    "imagenet32_new": ("imagenet32_new", {"train": "train", "test": "validation"}),
}
NAMES = tuple(BUILDERS) + ("tfds",)


def load(name: str, config_data: ml_collections.ConfigDict, split: str,
         select: RowSelector | None = None) -> tuple[np.ndarray | RowSubset, str]:
  """All images of a tfds split as one array (N, H, W, C) of levels (or a ``RowSubset`` of
  the rows ``select(N)`` returns, filtered before their images are decoded), and
  '<builder>:<version>'."""
  import tensorflow_datasets as tfds

  if name == "tfds":
    if not config_data.get("tfds_name"):
      raise DataError("data.dataset=tfds needs --config.data.tfds_name=<tfds name>, e.g. mnist")
    builder_name = config_data.tfds_name
    splits = {"train": config_data.tfds_train_split, "test": config_data.tfds_test_split}
    image_key = config_data.tfds_image_key
  else:
    (builder_name, splits), image_key = BUILDERS[name], "image"
  try:
    if name == "imagenet32_new":
      builder = _imagenet32_new_builder(config_data)
    else:
      builder = tfds.builder(builder_name, data_dir=config_data.tfds_data_dir)
      builder.download_and_prepare()
    if image_key not in builder.info.features:
      raise DataError(f"tfds data set {builder_name!r} has no feature {image_key!r} (set "
                      f"data.tfds_image_key); it has {sorted(builder.info.features)}")
    rows = None
    if select is not None:
      total = _num_records(builder, splits[split], image_key)
      rows = select(total)
    if rows is None:
      ds = builder.as_dataset(split=splits[split], shuffle_files=False)
      chunks = [np.asarray(b[image_key]) for b in tfds.as_numpy(ds.batch(1024))]
      total = sum(len(c) for c in chunks)
    else:
      rows = np.asarray(rows, np.int64)
      chunks = _some_rows(builder, splits[split], image_key, rows, total)
  except DataError:
    raise
  except Exception as e:  # tfds' many failure types (download, missing files, decoding)
    raise DataError(f"cannot load tfds data set {builder_name!r} split {splits[split]!r}: "
                    f"{described(e)}") from None
  if not total:
    raise DataError(f"tfds data set {builder_name!r} split {splits[split]!r} is empty")
  images = np.concatenate(chunks) if chunks else _no_images(builder.info.features[image_key])
  if images.ndim == 3:  # a feature without a channel axis
    images = images[..., None]
  if images.dtype not in (np.uint8, np.uint16):
    raise DataError(f"tfds data set {builder_name!r}: feature {image_key!r} holds "
                    f"{images.dtype} values, not 8- or 16-bit unsigned integers")
  images, suffix = as_levels(images, config_data,
                            f"tfds data set {builder_name!r} split {splits[split]!r}",
                            "the data set")
  out: np.ndarray | RowSubset = images
  if rows is not None:
    out = RowSubset(images, rows, total)
  return out, f"{builder_name}:{builder.info.version}" + suffix


def _num_records(builder: Any, split: str, image_key: str) -> int:
  """The record count of a split: from the builder's metadata, else the dataset's
  cardinality, else counted without decoding an image."""
  import tensorflow_datasets as tfds

  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError):
    pass
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_skip(builder, image_key))
  count = int(ds.cardinality())
  return count if count >= 0 else sum(1 for _ in tfds.as_numpy(ds.map(lambda ex: 0)))


def _skip(builder: Any, image_key: str) -> dict[str, Any] | None:
  """tfds decoders that keep an encoded image feature undecoded (None for other features)."""
  import tensorflow_datasets as tfds

  if isinstance(builder.info.features[image_key], tfds.features.Image):
    return {image_key: tfds.decode.SkipDecoding()}
  return None


def _some_rows(builder: Any, split: str, image_key: str, rows: np.ndarray, total: int
               ) -> list[np.ndarray]:
  """The images of the records ``rows`` of a split, in order, as numpy chunks: records are
  filtered by index before their image is decoded (an encoded image feature is read
  without decoding, then decoded for the kept records only)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  feature = builder.info.features[image_key]
  decoders = _skip(builder, image_key)
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  keep = np.zeros(total, bool)
  keep[rows] = True
  keep = tf.constant(keep)
  ds = ds.enumerate().filter(lambda i, ex: keep[i]).map(lambda i, ex: ex[image_key])
  if decoders:
    ds = ds.map(feature.decode_example)
  return [np.asarray(b) for b in tfds.as_numpy(ds.batch(1024))]


def _no_images(feature: Any) -> np.ndarray:
  """An empty (0, H, W, C) array of the feature's dtype (a process holding no rows)."""
  shape = tuple(d or 0 for d in feature.shape)
  return np.zeros((0,) + shape, np.dtype(feature.np_dtype))


def _imagenet32_new_builder(config_data: ml_collections.ConfigDict) -> Any:
  """The prepared imagenet32_new builder; prepares it from data.manual_dir the first time."""
  import tensorflow_datasets as tfds

  from diffode_jax.data import imagenet32_new  # imports tensorflow_datasets

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
