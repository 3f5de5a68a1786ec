"""The PRNG keys of a run: one root per purpose, all from ``config.seed``, and the indices
folded into an evaluation batch's key.

Keeping them apart means that, e.g., evaluating more often or sampling never changes the
training draws. Every index here is part of every reproduced number: never renumber.

The keys of one evaluation (``eval_bpd``, ``Model.bpd``), from its root key ``key``:

| key | draws |
|---|---|
| bkey = fold_in(key, b) | batch b |
| fold_in(bkey, i), i < K | dequantization sample i of K: split into noise and probe |
| fold_in(bkey, SDE_KEY_INDEX) | the sde_bpd term of the batch |
| fold_in(sample key, PERTURBATION_KEY_INDEX) | the reproducibility check's signs |

K (eval.num_importance) stays below SDE_KEY_INDEX, so no two rows of the table share a key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
  import ml_collections

PURPOSES = {"init": 0, "train": 1, "eval": 2, "sample": 3}

SDE_KEY_INDEX = 1 << 20  # above every sample index i < K
PERTURBATION_KEY_INDEX = 1 << 21  # folded into a sample key, apart from its split


def root_key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  """fold_in(PRNGKey(config.seed), PURPOSES[purpose])."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSES[purpose])


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The root key of evaluation: batch b of eval_bpd uses fold_in(eval_key, b)."""
  return root_key(config, "eval")
