"""Data sets, image folders, per-host batches and augmentation; offline (no network)."""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax import augmentation, data
from diffode_jax.config import finalize_config
from diffode_jax.data import DataError
from tiny import default_data as _data_config


# ----------------------------------------------------------------------------- ImageNet-32


def _pickled_batch(images, labels):
  """A batch as in the official zips: 'data' (N, 3072) channel-major, 1-based labels."""
  flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return pickle.dumps({"data": flat, "labels": [int(l) + 1 for l in labels],
                       "mean": flat.mean(axis=0)})


def _write_zip(path, members):
  with zipfile.ZipFile(path, "w") as z:
    for name, payload in members.items():
      z.writestr(name, payload)


@pytest.fixture
def imagenet32_zips(tmp_path):
  """Tiny Imagenet32_train.zip (batches 1, 2, 10, stored out of order) and Imagenet32_val.zip."""
  rng = np.random.default_rng(0)
  batches = {n: rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8) for n in (1, 2, 10)}
  labels = {n: rng.integers(0, 1000, 3) for n in batches}
  val = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_zip(manual / "Imagenet32_train.zip", {
      f"Imagenet32_train/train_data_batch_{n}": _pickled_batch(batches[n], labels[n])
      for n in (10, 1, 2)})
  _write_zip(manual / "Imagenet32_val.zip",
             {"Imagenet32_val/val_data": _pickled_batch(val, [0, 999])})
  train = np.concatenate([batches[n] for n in (1, 2, 10)])
  return manual, train, np.concatenate([labels[n] for n in (1, 2, 10)]), val


def test_imagenet32_new_reader_natural_order_and_channel_layout(imagenet32_zips):
  from diffode_jax.data import imagenet32_new

  manual, train, train_labels, _ = imagenet32_zips
  read = list(imagenet32_new.read_batches(str(manual / "Imagenet32_train.zip")))
  assert [name for name, _, _ in read] == [f"train_data_batch_{n}" for n in (1, 2, 10)]
  np.testing.assert_array_equal(np.concatenate([im for _, im, _ in read]), train)
  np.testing.assert_array_equal(np.concatenate([lb for _, _, lb in read]), train_labels)
  # Channel-major: element c * 1024 + h * 32 + w of a row is pixel (h, w), channel c.
  raw = pickle.loads(zipfile.ZipFile(manual / "Imagenet32_train.zip").read(
      "Imagenet32_train/train_data_batch_1"))["data"]
  assert raw[0, 2 * 1024 + 5 * 32 + 7] == train[0, 5, 7, 2]


def test_imagenet32_new_builder_prepares_from_manual_dir(imagenet32_zips, tmp_path):
  manual, train, _, val = imagenet32_zips
  config_data = _data_config(dataset="imagenet32_new", manual_dir=str(manual),
                             tfds_data_dir=str(tmp_path / "tfds"))
  loaded = data.load_split(config_data, "train")
  np.testing.assert_array_equal(loaded.images, train)  # original order kept
  assert loaded.version == "imagenet32_new:1.0.0"
  np.testing.assert_array_equal(data.load_split(config_data, "test").images, val)
  # Once prepared, the zips are no longer needed.
  config_data.manual_dir = None
  assert len(data.load_split(config_data, "test")) == 2


def test_imagenet32_new_without_manual_dir_is_a_data_error(tmp_path):
  config_data = _data_config(dataset="imagenet32_new", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="manual_dir"):
    data.load_split(config_data, "train")
  config_data.manual_dir = str(tmp_path)
  with pytest.raises(DataError, match="lacks Imagenet32_train.zip, Imagenet32_val.zip"):
    data.load_split(config_data, "train")


def test_imagenet32_new_refuses_pickles_that_run_code(tmp_path):
  from diffode_jax.data import imagenet32_new

  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))

  path = tmp_path / "Imagenet32_val.zip"
  _write_zip(path, {"val_data": pickle.dumps({"data": Evil(), "labels": []})})
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    list(imagenet32_new.read_batches(str(path)))


def _fixed_images_as_dataset(num_examples, shape):
  def as_dataset(self, *args, **kwargs):
    import tensorflow as tf

    del args, kwargs
    images = np.arange(num_examples * np.prod(shape), dtype=np.int64) % 256
    images = images.reshape((num_examples,) + shape).astype(np.uint8)
    return tf.data.Dataset.from_tensor_slices({"image": images})

  return as_dataset


def test_mock_imagenet32_old_loads_32x32(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config_data = _data_config(dataset="imagenet32_old")
  # downsampled_imagenet declares images of any size, so the default mock draws random
  # shapes; give it fixed 32x32x3 images instead.
  with tfds.testing.mock_data(as_dataset_fn=_fixed_images_as_dataset(5, (32, 32, 3))):
    loaded = data.load_split(config_data, "test")
  assert loaded.images.shape == (5, 32, 32, 3) and loaded.images.dtype == np.uint8
  assert loaded.version.startswith("downsampled_imagenet/32x32:")


def test_mock_cifar10_loads_and_wrong_size_is_a_data_error():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    loaded = data.load_split(_data_config(dataset="cifar10"), "train")
    assert loaded.images.shape == (6, 32, 32, 3) and loaded.version.startswith("cifar10:")
    with pytest.raises(DataError, match=r"shape \(32, 32, 3\), the config expects \(28, 28, 3\)"):
      data.load_split(_data_config(dataset="cifar10", image_size=28), "train")


def test_any_tfds_image_data_set_by_name():
  tfds = pytest.importorskip("tensorflow_datasets")
  config_data = _data_config(dataset="tfds", tfds_name="mnist", image_size=28, channels=1)
  with tfds.testing.mock_data(num_examples=6):
    loaded = data.load_split(config_data, "test")
    assert loaded.images.shape == (6, 28, 28, 1) and loaded.images.dtype == np.uint8
    assert loaded.version.startswith("mnist:") and loaded.name == "tfds"
    with pytest.raises(DataError, match=r"no feature 'picture'.*\['image', 'label'\]"):
      data.load_split(_data_config(dataset="tfds", tfds_name="mnist", image_size=28,
                                   channels=1, tfds_image_key="picture"), "train")
    five_bit = data.load_split(_data_config(dataset="tfds", tfds_name="mnist", image_size=28,
                                            channels=1, num_levels=32, reduce_bits=True),
                               "test")
    np.testing.assert_array_equal(five_bit.images, loaded.images >> 3)
    assert five_bit.version == loaded.version + ":reduced-to-32"
    assert loaded.images.max() >= 32  # mock pixels are uniform over 0..255
    with pytest.raises(DataError, match="does not fit data.num_levels=32.*reduce_bits"):
      data.load_split(_data_config(dataset="tfds", tfds_name="mnist", image_size=28,
                                   channels=1, num_levels=32), "test")
  with pytest.raises(DataError, match="needs --config.data.tfds_name"):
    data.load_split(_data_config(dataset="tfds"), "train")


def test_mock_cifar10_some_rows_are_those_of_the_whole_split():
  # A process of a multi-host evaluation loads only its rows (records filtered by index
  # before their PNG is decoded); they must be the whole split's rows, same version.
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=7):
    whole = data.load_split(_data_config(dataset="cifar10"), "test")
    part = data.load_split(_data_config(dataset="cifar10"), "test", lambda n: [0, 2, 6])
    none = data.load_split(_data_config(dataset="cifar10"), "test", lambda n: [])
  _check_some_rows(whole, part, [0, 2, 6])
  assert none.images.shape == whole.images.shape and len(none.images.local) == 0


def _check_some_rows(whole, part, rows):
  assert isinstance(part.images, data.RowSubset) and part.version == whole.version
  assert part.images.shape == whole.images.shape and len(part.images) == len(whole)
  assert part.images.dtype == whole.images.dtype
  np.testing.assert_array_equal(part.images[np.array(rows)], whole.images[rows])
  np.testing.assert_array_equal(part.images[rows[-1]], whole.images[rows[-1]])
  missing = next(i for i in range(len(whole)) if i not in rows)
  with pytest.raises(IndexError, match="not held"):
    part.images[np.array([rows[0], missing])]
  first = part.images[:rows[1] + 1]  # eval.num_images: the first n, still partial
  assert len(first) == rows[1] + 1 and list(first.rows) == rows[:2]


def test_embedded_some_rows():
  config_data = _data_config(dataset="digits", image_size=8, channels=1, num_levels=17)
  whole = data.load_split(config_data, "test")
  _check_some_rows(whole, data.load_split(config_data, "test", lambda n: [5, 7, n - 1]),
                   [5, 7, len(whole) - 1])


# ----------------------------------------------------------------------------- folders


def test_image_folder_reads_only_the_selected_files(tmp_path, monkeypatch):
  from diffode_jax.data import image_folder

  images = _images(5)
  for i, image in enumerate(images):
    _png(tmp_path / "test" / f"{i}.png", image)
  _png(tmp_path / "train" / "0.png", images[0])
  config_data = _folder_config(tmp_path)
  whole = data.load_split(config_data, "test")
  read = []
  original = image_folder._read_bytes
  monkeypatch.setattr(image_folder, "_read_bytes", lambda p: read.append(p) or original(p))
  part = data.load_split(config_data, "test", lambda n: [1, 4])
  assert sorted(os.path.basename(p) for p in read) == ["1.png", "4.png"]
  _check_some_rows(whole, part, [1, 4])


def _png(path, array):
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _png16(path, array):
  """A 16-bit PNG (grey or RGB): Pillow cannot write 16-bit RGB, TensorFlow can."""
  import tensorflow as tf

  os.makedirs(os.path.dirname(path), exist_ok=True)
  array = array[..., None] if array.ndim == 2 else array
  with open(path, "wb") as f:
    f.write(tf.io.encode_png(tf.constant(array, tf.uint16)).numpy())


def _images(n, shape=(8, 8, 3), high=256, seed=0):
  return np.random.default_rng(seed).integers(0, high, (n,) + shape, dtype=np.uint8)


def _folder_config(root, **fields):
  return _data_config(**{"dataset": "image_folder", "folder": str(root), "image_size": 8,
                          **fields})


def test_image_folder_train_test_subfolders(tmp_path):
  train, test = _images(5), _images(2, seed=1)
  names = ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]  # nested files too
  for name, image in zip(names, train):
    _png(tmp_path / "train" / name, image)
  for i, image in enumerate(test):
    _png(tmp_path / "test" / f"{i}.png", image)
  config_data = _folder_config(tmp_path)
  loaded = data.load_split(config_data, "train")
  np.testing.assert_array_equal(loaded.images, train)  # sorted path order
  np.testing.assert_array_equal(data.load_split(config_data, "test").images, test)
  assert loaded.version == data.load_split(config_data, "train").version
  _png(tmp_path / "train" / "f.png", train[0])
  assert data.load_split(config_data, "train").version != loaded.version


def test_image_folder_pool_with_holdout_fraction(tmp_path):
  images = _images(40)
  for i, image in enumerate(images):
    _png(tmp_path / f"{i:02d}.png", image)
  config_data = _folder_config(tmp_path, holdout_fraction=0.25)
  train = data.load_split(config_data, "train").images
  test = data.load_split(config_data, "test").images
  assert len(train) + len(test) == 40 and 0 < len(test) < 20
  held = {i for i in range(40) if data.is_held_out(f"{i:02d}.png", 0.25)}
  np.testing.assert_array_equal(test, images[sorted(held)])
  _png(tmp_path / "new.png", images[0])  # a new file moves no other file between splits
  assert np.array_equal(data.load_split(config_data, "test").images[:len(test)], test) or \
      data.is_held_out("new.png", 0.25)
  with pytest.raises(DataError, match="holdout_fraction"):
    data.load_split(_folder_config(tmp_path), "test")


def test_image_folder_bit_depth(tmp_path):
  gray = _images(3, shape=(8, 8), seed=2)
  for i, image in enumerate(gray):
    _png(tmp_path / "train" / f"{i}.png", image)
  config = dict(channels=1, num_levels=16)
  with pytest.raises(DataError, match=r"does not fit data.num_levels=16.*reduce_bits"):
    data.load_split(_folder_config(tmp_path, **config), "train")
  reduced = data.load_split(_folder_config(tmp_path, reduce_bits=True, **config), "train")
  np.testing.assert_array_equal(reduced.images[..., 0], gray >> 4)  # floor(p * 16 / 256)
  assert reduced.version.endswith(":reduced-to-16")
  for i, image in enumerate(gray):  # files that hold levels 0..15 directly
    _png(tmp_path / "train" / f"{i}.png", image >> 4)
  direct = data.load_split(_folder_config(tmp_path, **config), "train")
  np.testing.assert_array_equal(direct.images, reduced.images)


def test_image_folder_sixteen_bit(tmp_path):
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 65536, (3, 8, 8, 3), dtype=np.uint16)
  for i, image in enumerate(rgb):
    _png16(tmp_path / "rgb" / "train" / f"{i}.png", image)
  loaded = data.load_split(_folder_config(tmp_path / "rgb", num_levels=65536), "train")
  assert loaded.images.dtype == np.uint16 and loaded.version.endswith(":16bit")
  np.testing.assert_array_equal(loaded.images, rgb)  # every bit kept
  with pytest.raises(DataError, match="holds 16-bit images, data.num_levels=70000 > 65536"):
    data.load_split(_folder_config(tmp_path / "rgb", num_levels=70000), "train")
  # Glow-style reduction: to 12 bits (uint16) and to 8 bits (uint8)
  to12 = data.load_split(_folder_config(tmp_path / "rgb", num_levels=4096, reduce_bits=True),
                         "train")
  assert to12.images.dtype == np.uint16
  np.testing.assert_array_equal(to12.images, rgb >> 4)
  to8 = data.load_split(_folder_config(tmp_path / "rgb", num_levels=256, reduce_bits=True),
                        "train")
  assert to8.images.dtype == np.uint8
  np.testing.assert_array_equal(to8.images, rgb >> 8)
  # 12-bit grey data stored directly in 16-bit PNGs (Pillow writes those too)
  from PIL import Image

  grey = rng.integers(0, 4096, (2, 8, 8), dtype=np.uint16)
  os.makedirs(tmp_path / "grey" / "train")
  for i, image in enumerate(grey):
    Image.fromarray(image).save(tmp_path / "grey" / "train" / f"{i}.png")
  direct = data.load_split(_folder_config(tmp_path / "grey", channels=1, num_levels=4096),
                           "train")
  np.testing.assert_array_equal(direct.images[..., 0], grey)
  with pytest.raises(DataError, match="holds 8-bit images, data.num_levels=1024 > 256"):
    _png(tmp_path / "eight" / "train" / "a.png", _images(1)[0])
    data.load_split(_folder_config(tmp_path / "eight", num_levels=1024), "train")


def test_image_folder_non_square(tmp_path):
  images = _images(3, shape=(6, 10, 3), seed=4)
  for i, image in enumerate(images):
    _png(tmp_path / "train" / f"{i}.png", image)
  config_data = _folder_config(tmp_path, image_size=6, image_width=10)
  assert data.image_shape(config_data) == (6, 10, 3)
  np.testing.assert_array_equal(data.load_split(config_data, "train").images, images)
  with pytest.raises(DataError, match=r"expects \(10, 6, 3\) \(data.image_size, "
                                      r"data.image_width, data.channels\)"):
    data.load_split(_folder_config(tmp_path, image_size=10, image_width=6), "train")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no PNG or JPEG images"),
    ("unreadable", "cannot read image"),
    ("wrong_size", r"has shape \(16, 16, 3\), the config expects \(8, 8, 3\)"),
    ("wrong_channels", r"has shape \(8, 8\, 1\), the config expects \(8, 8, 3\)"),
    ("sixteen_bit_above_v", r"pixel value 1000 does not fit data.num_levels=256.*16-bit "
                            r"values p to floor\(p \* 256 / 65536\)"),
    ("mixed_depths", "mixes bit depths"),
    ("corrupt_sixteen_bit", "cannot read image"),
    ("no_test", "no test/ subfolder"),
])
def test_image_folder_bad_input(tmp_path, case, message):
  root = tmp_path / "images"
  (root / "train").mkdir(parents=True)
  split = "train"
  if case == "missing":
    root = tmp_path / "nothing_here"
  elif case == "empty":
    (root / "train" / "notes.txt").write_text("no images")
  elif case == "unreadable":
    (root / "train" / "broken.png").write_bytes(b"\x89PNG not really")
  elif case == "wrong_size":
    _png(root / "train" / "big.png", _images(1, shape=(16, 16, 3))[0])
  elif case == "wrong_channels":
    _png(root / "train" / "gray.png", _images(1, shape=(8, 8))[0])
  elif case == "sixteen_bit_above_v":
    _png16(root / "train" / "deep.png", np.full((8, 8, 3), 1000, np.uint16))
  elif case == "mixed_depths":
    _png(root / "train" / "a.png", _images(1)[0])
    _png16(root / "train" / "b.png", np.full((8, 8, 3), 1000, np.uint16))
  elif case == "corrupt_sixteen_bit":
    _png16(root / "train" / "deep.png", np.full((8, 8, 3), 1000, np.uint16))
    intact = (root / "train" / "deep.png").read_bytes()
    (root / "train" / "deep.png").write_bytes(intact[:40])
  elif case == "no_test":
    _png(root / "train" / "ok.png", _images(1)[0])
    split = "test"
  with pytest.raises(DataError, match=message):
    data.load_split(_folder_config(root), split)


# ----------------------------------------------------------------------------- batches


def test_batches_are_deterministic_and_split_over_hosts():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  split = data.ImageData(images, "toy", "train", "v")
  seen = np.concatenate([data.batch_indices(10, 5, step, seed=3) for step in range(2)])
  assert sorted(seen) == list(range(10))  # one epoch is a permutation
  assert not np.array_equal(data.batch_indices(10, 5, 2, 3), data.batch_indices(10, 5, 0, 3))
  for step in (0, 7, 123):
    whole = data.host_batch(split, 6, step, seed=3)
    halves = [data.host_batch(split, 6, step, 3, process_index=i, process_count=2)
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    np.testing.assert_array_equal(data.host_batch(split, 6, step, seed=3), whole)


# ----------------------------------------------------------------------------- augmentation


def test_augmentations_are_the_eight_symmetries_of_the_square():
  k = jnp.asarray(_images(1, shape=(4, 4, 2)))
  out = [np.asarray(augmentation.transform(k, a)) for a in range(8)]
  assert np.array_equal(out[augmentation.IDENTITY], np.asarray(k))
  assert len({o.tobytes() for o in out}) == 8  # all different on a generic image
  for a in range(8):  # each is a permutation of the pixels that keeps the histogram
    assert sorted(out[a].ravel()) == sorted(np.asarray(k).ravel())
  # Flips are involutions; four quarter turns are the identity.
  for a in range(4, 8):
    np.testing.assert_array_equal(augmentation.transform(jnp.asarray(out[a]), a), k)
  np.testing.assert_array_equal(augmentation.transform(jnp.asarray(out[1]), 3), k)


def test_augment_applies_the_symmetry_named_by_cond():
  k = jnp.asarray(_images(64, shape=(4, 4, 1)))
  key = jax.random.PRNGKey(5)
  out, cond = augmentation.augment(key, k)
  again, cond_again = augmentation.augment(key, k)
  np.testing.assert_array_equal(out, again)  # deterministic from the key
  np.testing.assert_array_equal(cond, cond_again)
  assert cond.shape == (64, 8) and np.all(np.asarray(cond).sum(axis=1) == 1)
  indices = np.asarray(cond).argmax(axis=1)
  assert len(set(indices)) > 4  # uses many of the 8
  for i in range(64):
    np.testing.assert_array_equal(out[i:i + 1], augmentation.transform(k[i:i + 1], indices[i]))
  with pytest.raises(ValueError, match="square"):
    augmentation.augment(key, jnp.zeros((2, 4, 6, 1), jnp.uint8))


def test_augmented_config_gives_the_network_a_condition_input():
  """Wiring only (traced, not compiled): init makes the cond layer, and both the loss with
  cond and the drift without it (the identity) trace through the U-Net."""
  from configs import digits
  from diffode_jax.model import build

  config = digits.get_config()
  config.model.channels, config.model.num_blocks, config.model.embed_dim = 8, 1, 16
  key = jax.random.PRNGKey(0)
  plain = jax.eval_shape(build(finalize_config(config)).init_params, key)
  config.data.augment = True
  components = build(finalize_config(config))
  params = jax.eval_shape(components.init_params, key)
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(plain)) + 2  # Dense(cond)
  k = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.uint8)
  cond = jax.ShapeDtypeStruct((4, augmentation.NUM_AUGMENTATIONS), jnp.float32)
  loss, _ = jax.eval_shape(lambda p, k, c: components.loss_fn(p, k, key, True, cond=c),
                           params, k, cond)
  assert loss.shape == ()
  x = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32)
  gamma = jax.ShapeDtypeStruct((4,), jnp.float32)
  assert jax.eval_shape(components.drift, params, x, gamma).shape == (4, 8, 8, 1)
