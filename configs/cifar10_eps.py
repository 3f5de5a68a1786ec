"""CIFAR-10 baseline: eps parameterization with uniform time (no importance sampling)."""

from configs import cifar10_velocity


def get_config():
  config = cifar10_velocity.get_config()
  config.model.parameterization = "eps"
  config.training.importance_sampling = False
  return config
