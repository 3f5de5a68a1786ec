"""The trained model of a workdir, for evaluation and sampling: the network's components
and the EMA params of one of its checkpoints (``restore_for_eval``), read through the
checkpoint store (``diffode_jax.checkpoint``)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from diffode_jax import keys, storage
from diffode_jax.checkpoint import Checkpointer
from diffode_jax.errors import CheckpointError
from diffode_jax.model import Components, build
from diffode_jax.networks import check_sees_time
from diffode_jax.paths import checkpoint_dir

PyTree = Any


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str,
                       components: Components, step: int | None = None,
                       damaged: list[int] | None = None) -> tuple[PyTree, int]:
  """(EMA params, step) of a checkpoint; CheckpointError if there is none or it mismatches.

  With step None the latest intact checkpoint: damaged ones are moved aside (see
  Checkpointer) and their steps appended to ``damaged`` when given.
  """
  directory = checkpoint_dir(workdir)
  if not storage.isdir(directory):
    raise CheckpointError(f"no checkpoints in {directory}: train first (--mode=train)")
  ckpt = Checkpointer(directory, create=False)
  try:
    template = jax.eval_shape(components.init_params, keys.root_key(config, "init"))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    _, ema_params, step = ckpt.restore_params(template, step, fallback=True)
    if damaged is not None:
      damaged.extend(ckpt.damaged)
    return ema_params, step
  finally:
    ckpt.close()


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                     damaged: list[int] | None = None
                     ) -> tuple[Components, PyTree, int | None]:
  """(components, params, checkpoint step) of a finalized config, for evaluation/sampling.

  The U-Net restores the EMA params of a checkpoint in workdir (the latest when step is
  None). The oracle (docs/design.md, The oracle) has no checkpoint: its params are the training
  split, step
  is None.
  """
  if config.model.arch == "oracle":
    from diffode_jax import data

    train = data.load_split(config.data, "train").images
    assert isinstance(train, np.ndarray)  # the whole split: no rows were asked for
    components = build(config, train_images=train)
    return components, components.init_params(jax.random.key(0)), None  # key unused
  components = build(config)
  params, ckpt_step = restore_ema_params(config, workdir, components, step, damaged)
  check_sees_time(config.model, from_scratch=False)
  return components, params, ckpt_step
