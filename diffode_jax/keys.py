"""The root PRNG keys of a run: one per purpose, all from ``config.seed``.

Keeping them apart means that, e.g., evaluating more often or sampling never changes the
training draws. The purpose indices are part of every reproduced number: never renumber.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
  import ml_collections

PURPOSES = {"init": 0, "train": 1, "eval": 2, "sample": 3}


def root_key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  """fold_in(PRNGKey(config.seed), PURPOSES[purpose])."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSES[purpose])


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The root key of evaluation: batch b of eval_bpd uses fold_in(eval_key, b)."""
  return root_key(config, "eval")
