"""8-bit 8x8 RGB tiles of scikit-learn's two sample photos (embedded), CPU-sized.

Split: train = tiles inside the left 75% of each photo's width, test = the right 25%.
Same network and budget as configs/digits.py, so the two are comparable.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.data.dataset = "photo_patches"
  config.data.channels = 3
  config.data.num_levels = 256
  config.model.fourier_min = 6  # V = 256: bins 2/256 apart
  config.model.fourier_max = 7
  return config
