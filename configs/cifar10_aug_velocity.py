"""CIFAR-10 with data augmentation (the paper's 2.42 bits/dim), as the official
configs/cifar10_aug.py: attention after every block, 256 channels (embedding 1024),
dropout 0.05, batch 1024, K = 20 importance samples at evaluation, random flips and
quarter turns with the official "was transformed" flag as the network's conditioning.

The official run's 10M-step budget is kept; its released checkpoint is at 1.95M steps
(no second-order fine-tune).
"""

from configs import cifar10_velocity


def get_config():
  config = cifar10_velocity.get_config()
  config.data.augment = True
  m = config.model
  m.block_attention = True
  m.channels = 256
  m.embed_dim = 1024
  m.dropout = 0.05
  config.training.batch_size = 1024
  config.training.num_steps = 10_000_000
  config.eval.num_importance = 20
  return config
