"""``--mode=import_official``: a released i-DODE checkpoint (``official.py`` reads and
converts it) written into a normal workdir: config.json, checkpoints/<official step> and
import.json (what was imported, and the layout read from the checkpoint's shapes)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from diffode_jax import official, paths, storage
from diffode_jax.checkpoint import Checkpointer, checkpoint_dir, committed_steps
from diffode_jax.errors import CheckpointError, ConfigError
from diffode_jax.model import build, count_params
from diffode_jax.networks import check_sees_time
from diffode_jax.run import workdir as workdir_lib

if TYPE_CHECKING:
  import ml_collections


def import_checkpoint(config: ml_collections.ConfigDict, workdir: str, path: str | None
                      ) -> dict[str, Any]:
  """Writes workdir (config.json, checkpoints/<official step>, import.json) from an
  official checkpoint; returns what import.json holds. Everything is read and checked
  before the first file is written, and an existing checkpoint is never overwritten."""
  if not path:
    raise ConfigError("--mode=import_official needs --official_checkpoint=PATH (a released "
                      "checkpoints-0 directory or its ckpt-N.flax file)")
  config = official.import_config(config)
  workdir_lib.check_writable(workdir)
  directory = checkpoint_dir(workdir)
  # Only committed steps count: an import killed during its save leaves an orbax temporary
  # folder, which the Checkpointer below removes before saving again.
  if committed_steps(checkpoint_dir(workdir)):
    raise CheckpointError(f"{directory} already holds checkpoints; import into a new workdir")
  file, raw = official.read(path)
  imported = official.convert(raw, config, file)
  components = build(config)
  state = official.train_state(imported, config, components)
  check_sees_time(config.model, from_scratch=False)

  workdir_lib.ensure(workdir)
  ckpt = Checkpointer(directory, keep=config.training.keep_checkpoints, owner=True)
  try:
    ckpt.save(imported.step, state)
  finally:
    ckpt.close()
  workdir_lib.write_json(paths.config_path(workdir), config.to_dict())
  report = {"source": storage.absolute(file), "step": imported.step,
            "params": count_params(state.params), "optimizer": imported.adam_note,
            "layout": dataclasses.asdict(imported.layout),
            "from_config": {"image_size": config.data.image_size,
                            "schedule": config.model.schedule,
                            "parameterization": config.model.parameterization,
                            "gamma_min": config.model.gamma_min,
                            "gamma_max": config.model.gamma_max,
                            "num_levels": config.data.num_levels}}
  workdir_lib.write_json(paths.import_report_path(workdir), report)
  return report
