"""ImageNet-32, the *new* (anti-aliased) version, as a tfds builder over the official zips.

Two versions of 32x32 ImageNet circulate and their bits/dim differ by about 0.25
(i-DODE: 3.43 new vs 3.69 old), so the names keep them apart:

* ``imagenet32_old``: tfds ``downsampled_imagenet/32x32`` (van den Oord et al. 2016), the
  version of ScoreSDE and VDM.
* ``imagenet32_new``: the box-resized, anti-aliased ``Imagenet32_train.zip`` /
  ``Imagenet32_val.zip`` of Chrabaszcz et al. 2017 (image-net.org, "Downsampled ImageNet
  32x32"), the version of Flow Matching and i-DODE's 3.43. This module.

The zips need an ImageNet account, so they are a manual download: put both in one
directory and pass it as ``--config.data.manual_dir``. Inside, each zip holds pickled
batches (``train_data_batch_1`` .. ``train_data_batch_10``, ``val_data``), each a dict with
``data``, a uint8 array (N, 3072) of images in channel-major order (3 planes of 32x32),
and ``labels``, 1-based class indices. ``read_batches`` reads them straight from the zip;
the builder turns them into a tfds data set (prepared once under the tfds data_dir, in the
original order: train batch 1 first, image 0 first).

The pickles are unpickled with a loader that admits only NumPy arrays and plain
containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

TRAIN_ZIP = "Imagenet32_train.zip"
VAL_ZIP = "Imagenet32_val.zip"
IMAGE_SIZE = 32
BUILDER_VERSION = "1.0.0"

_BATCH = re.compile(r"(?:^|/)(train_data_batch_(\d+)|val_data)$")
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"),
    ("_codecs", "encode"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles NumPy arrays and containers only."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an ImageNet-32 batch")


def _batch_order(name: str) -> int:
  match = _BATCH.search(name)
  assert match is not None  # only called on the names _BATCH matched
  return int(match.group(2)) if match.group(2) else 0


def batch_names(zip_path: str) -> list[str]:
  """Pickled batch members of a zip, in their natural order (batch 2 before batch 10)."""
  with zipfile.ZipFile(zip_path) as z:
    names = [n for n in z.namelist() if _BATCH.search(n)]
  return sorted(names, key=_batch_order)


def read_batches(zip_path: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (member name, uint8 images (N, 32, 32, 3), 0-based labels (N,)) per batch."""
  names = batch_names(zip_path)
  if not names:
    raise ValueError(f"{zip_path} holds no train_data_batch_* or val_data member")
  with zipfile.ZipFile(zip_path) as z:
    for name in names:
      with z.open(name) as f:
        batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
      data = np.asarray(batch["data"], dtype=np.uint8)
      if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE**2:
        raise ValueError(f"{zip_path}:{name}: 'data' has shape {data.shape}, expected "
                         f"(N, {3 * IMAGE_SIZE**2})")
      images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
      labels = np.asarray(batch["labels"], dtype=np.int64) - 1
      yield os.path.basename(name), images, labels


def missing_files(manual_dir: str) -> list[str]:
  return [n for n in (TRAIN_ZIP, VAL_ZIP) if not os.path.isfile(os.path.join(manual_dir, n))]


class Imagenet32New(tfds.core.GeneratorBasedBuilder):
  """The anti-aliased 32x32 ImageNet of Chrabaszcz et al. 2017 (see the module docstring)."""

  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {BUILDER_VERSION: "Imagenet32_train.zip / Imagenet32_val.zip, original order."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {TRAIN_ZIP} and {VAL_ZIP} from https://image-net.org/download-images.php "
      "(Downsampled ImageNet 32x32) into one directory and pass it as "
      "--config.data.manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(num_classes=1000),
        }),
        supervised_keys=("image", "label"),
        homepage="https://image-net.org/download-images.php",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any
                        ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
    root = os.fspath(dl_manager.manual_dir)
    return {
        "train": self._generate_examples(os.path.join(root, TRAIN_ZIP)),
        "validation": self._generate_examples(os.path.join(root, VAL_ZIP)),
    }

  def _generate_examples(self, zip_path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, images, labels in read_batches(zip_path):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield f"{name}_{i:06d}", {"image": image, "label": int(label)}
