"""``--mode=sample``: images by the reverse probability-flow ODE, written to
samples/grid.png, samples.npz and sample.json.

Each batch of ``sample.batch_size`` images is split over every device of every process
(``sampling.make_sample_fn``); every process gets every image and process 0 alone writes
samples/.
"""

from __future__ import annotations

import io
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from diffode_jax import data as data_lib
from diffode_jax import keys, parallel, paths, storage
from diffode_jax.trained import restore_for_eval
from diffode_jax.config import sample_settings
from diffode_jax.errors import WorkdirError
from diffode_jax.report import devices_fields, model_fields
from diffode_jax.run import workdir as workdir_lib
from diffode_jax.run.evaluate import model_config
from diffode_jax.model import Components
from diffode_jax.sampling import SampleSettings, draw, image_grid, make_sample_fn


def sample(config: ml_collections.ConfigDict, workdir: str,
           command_line_fields: set[str] | None = None) -> str:
  """Draws config.sample.num_samples images; writes samples/grid.png, samples.npz, sample.json.

  Returns the path of grid.png. NFE per batch goes to samples.npz and sample.json.
  """
  config = model_config(config, workdir, command_line_fields)
  s = config.sample
  mesh = parallel.make_mesh()
  parallel.check_batch(s.batch_size, "sample.batch_size")
  damaged: list[int] = []
  components, params, ckpt_step = restore_for_eval(config, workdir, damaged=damaged)
  workdir_lib.ensure(workdir)
  settings = sample_settings(config)
  shape = (s.batch_size,) + data_lib.image_shape(config.data)
  sample_fn = make_sample_fn(components.drift, components.schedule, components.num_levels,
                             shape, settings, mesh)
  start = time.perf_counter()
  images, nfes = draw(sample_fn, params, keys.root_key(config, "sample"), s.num_samples,
                      s.batch_size)
  wall = time.perf_counter() - start

  out_dir = paths.samples_dir(workdir)
  grid_path = paths.sample_grid_path(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      _write(workdir, images, nfes, components, config, ckpt_step, settings,
             mesh, wall, damaged)
    except OSError as err:  # a full disk or a read-only workdir
      error = WorkdirError(f"cannot write the samples to {out_dir}: "
                           f"{storage.describe(err)}; rerun when it can be written (the "
                           f"draw is the same)")
  if parallel.on_any_process(error is not None):  # every process stops, none waits
    raise error or WorkdirError(f"process 0 could not write the samples to {out_dir}")
  parallel.sync("diffode_jax: samples written")
  return grid_path


def _write(workdir: str, images: np.ndarray, nfes: list[int], components: Components,
           config: ml_collections.ConfigDict, ckpt_step: int | None, settings: SampleSettings,
           mesh: jax.sharding.Mesh, wall: float, damaged: list[int]) -> None:
  from PIL import Image  # a dependency for the PNG grid only

  out_dir = paths.samples_dir(workdir)
  storage.makedirs(out_dir)
  grid = image_grid(images, components.num_levels)
  png = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png, format="PNG")
  storage.write_bytes(paths.sample_grid_path(workdir), png.getvalue())
  npz = io.BytesIO()
  np.savez(npz, images=images, nfe=np.asarray(nfes), num_levels=components.num_levels)
  storage.write_bytes(paths.samples_path(workdir), npz.getvalue())
  workdir_lib.write_json(paths.sample_report_path(workdir), {
      "checkpoint_step": ckpt_step, **model_fields(config), "num_samples": len(images),
      "decode": settings.decode, "solver": settings.solver.solver,
      "rtol": settings.solver.rtol, "atol": settings.solver.atol,
      "precision": settings.precision, **devices_fields(mesh.size, jax.process_count()),
      "nfe_mean": float(np.mean(nfes)), "wall_time_s": wall,
      **({"damaged_checkpoints": sorted(damaged)} if damaged else {})})
  logging.info("wrote %d samples to %s (NFE %.0f per batch)", len(images), out_dir,
               np.mean(nfes))
