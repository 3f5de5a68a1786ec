"""ImageNet-32, new anti-aliased version (image-net.org Imagenet32_{train,val}.zip; the
paper's 3.43 bits/dim), as the official configs/imagenet32_new.py: the network of
imagenet32_old_velocity.py at batch 128, 2M steps. Needs --config.data.manual_dir (see
the README)."""

from configs import imagenet32_old_velocity


def get_config():
  config = imagenet32_old_velocity.get_config()
  config.data.dataset = "imagenet32_new"
  config.training.batch_size = 128
  return config
