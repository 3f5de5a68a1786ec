"""The embedded default: scikit-learn's 8x8 digits (17 levels), CPU-sized.

Trains in a few minutes on 2 CPU cores. Split: train = first 1437 images of
numpy.random.default_rng(0).permutation(1797), test = the other 360.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_levels = 17
  m = config.model
  m.channels = 32
  m.num_groups = 8  # 4 channels per GroupNorm group, as the CIFAR-10 reference (see
  # networks/unet.py, time_norm_group_size: one per group would remove the time input)
  m.num_blocks = 2
  m.embed_dim = 128
  m.attention = True
  m.dropout = 0.1
  m.fourier_min = 2  # V = 17: bins 2/17 apart, so frequencies 2^2, 2^3 resolve them
  m.fourier_max = 3
  t = config.training
  t.batch_size = 128
  t.num_steps = 3000  # about 8 minutes on 2 CPU cores (6 steps/s)
  t.learning_rate = 2e-3
  t.warmup_steps = 200
  t.ema_decay = 0.999
  t.log_every = 100
  t.checkpoint_every = 500
  t.eval_every = 0
  config.eval.batch_size = 360
  config.sample.num_samples = 64
  return config
