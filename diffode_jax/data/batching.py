"""Step-indexed batches: the global batch of a step is a pure function of (seed, step).

The data order is a fresh permutation per epoch (``epoch_permutation``), so a resumed run
reads exactly the batches an uninterrupted run would, whatever the number of hosts. Each
host holds the array of the split (ImageNet-32 train: 3.9 GB) and takes only its own
contiguous slice of every global batch (``host_batch``).
"""

from __future__ import annotations

import functools

import numpy as np

from diffode_jax.data.spec import ImageData


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the global batch of ``step``: epochs are fresh permutations of the data."""
  flat = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, positions = np.divmod(flat, num_examples)
  out = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    perm = epoch_permutation(num_examples, seed, int(epoch))
    mask = epochs == epoch
    out[mask] = perm[positions[mask]]
  return out


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The data order of one epoch (cached: a permutation of 1.28M indices takes ~30 ms)."""
  perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def host_batch(data: ImageData, batch_size: int, step: int, seed: int,
               process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This host's slice of the global batch of ``step``."""
  idx = batch_indices(len(data), batch_size, step, seed)
  per_host = batch_size // process_count
  return data.images[idx[process_index * per_host:(process_index + 1) * per_host]]
