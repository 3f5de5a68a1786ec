"""ImageNet-32, old version (tfds downsampled_imagenet/32x32; the paper's 3.69 bits/dim),
as the official configs/imagenet32.py: 256 channels (embedding 1024), batch 512, 2M steps.

Its second-order fine-tune ("+500k" micro-batches of 128, accumulated 4 at a time) is
125,000 updates here: see the README's reproduction section.
"""

from configs import cifar10_velocity


def get_config():
  config = cifar10_velocity.get_config()
  config.data.dataset = "imagenet32_old"
  config.model.channels = 256
  config.model.embed_dim = 1024
  config.training.batch_size = 512
  config.training.num_steps = 2_000_000
  return config
