"""Config validation: the checks of config.data (``data.check_data_config``) and of the
whole config (``finalize_config``) that run before any data loads."""

import pytest

from diffode_jax import data
from diffode_jax.config import finalize_config
from diffode_jax.errors import ConfigError
from tiny import default_data


def test_unknown_dataset_points_to_the_tfds_route():
  with pytest.raises(ValueError, match="--config.data.dataset=tfds --config.data.tfds_name=mnist"):
    data.check_data_config(default_data(dataset="mnist"))


def test_augment_needs_square_images(tmp_path):
  with pytest.raises(ValueError, match="quarter turns, which need square images; got 6x10"):
    data.check_data_config(default_data(dataset="image_folder", folder=str(tmp_path),
                                        image_size=6, image_width=10, augment=True))


@pytest.mark.parametrize("section, field, value, message", [
    ("data", "dataset", "mnist", "unknown data.dataset 'mnist'"),
    ("data", "holdout_fraction", 1.5, "holdout_fraction"),
    ("training", "dequantization", "gaussian", "unknown training.dequantization"),
    ("training", "batch_size", 0, "training.batch_size must be an integer >= 1"),
    ("training", "grad_accum_steps", 0, "grad_accum_steps"),
    ("training", "ema_decay", 1.5, "ema_decay"),
])
def test_finalize_config_rejects_bad_values(section, field, value, message):
  from configs import digits

  config = digits.get_config()
  config[section][field] = value
  with pytest.raises(ConfigError, match=message):
    finalize_config(config)


@pytest.mark.parametrize("levels, expected", [(2, (-1, 0)), (17, (3, 4)), (256, (6, 7)),
                                              (4096, (10, 11)), (65536, (14, 15))])
def test_fourier_frequencies_follow_the_bit_depth(levels, expected):
  from configs import default

  config = default.get_config()
  config.data.num_levels = levels
  final = finalize_config(config)
  assert (final.model.fourier_min, final.model.fourier_max) == expected
  # the finest frequency 2^max * 2 pi is the coarsest whose period 2^-max fits in a bin
  assert 2.0**-expected[1] <= 2 / levels < 2.0**-(expected[1] - 1)
  config.model.fourier_max = 9  # explicit values stay
  assert finalize_config(config).model.fourier_min == 8
  config.model.fourier_min = 10
  with pytest.raises(ConfigError, match="fourier_min"):
    finalize_config(config)


def test_config_json_of_an_older_version_gets_the_fields_that_do_not_change_training(
    tmp_path):
  """config.json written before model.remat, training.precision, eval.precision and
  eval.exact_trace_chunk existed still loads, with the values such a run used."""
  import json

  from configs import digits
  from diffode_jax.config import read_workdir_config

  written = finalize_config(digits.get_config()).to_dict()
  for section, name in (("model", "remat"), ("training", "precision"),
                        ("eval", "precision"), ("eval", "exact_trace_chunk")):
    del written[section][name]
  (tmp_path / "config.json").write_text(json.dumps(written))
  config = read_workdir_config(str(tmp_path))
  assert (config.model.remat, config.training.precision, config.eval.precision,
          config.eval.exact_trace_chunk) == (False, "default", "highest", None)
