"""CIFAR-10, i-DODE reference (SPEC 7): VP, velocity, importance sampling, 128 channels."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  return config
