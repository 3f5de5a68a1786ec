"""Dispatch for main.py: runs a mode and turns expected failures into one stderr line."""

from __future__ import annotations

import json
import sys

from diffode_jax.checkpoint import CheckpointError
from diffode_jax.data import DataError
from diffode_jax.likelihood import LikelihoodError
from diffode_jax.model import ConfigError
from diffode_jax.run import TrainingError
from diffode_jax.sampling import SamplingError

USER_ERRORS = (CheckpointError, DataError, LikelihoodError, ConfigError, TrainingError,
               SamplingError)


def dispatch(config, workdir: str, mode: str, official_checkpoint: str | None = None) -> int:
  """Runs mode; returns the process exit status."""
  from diffode_jax import run

  try:
    run.check_local_workdir(workdir)
    if mode == "train":
      row = run.train(config, workdir)
      if row:
        print(json.dumps({"step": row["step"], "loss_bpd": row["loss"],
                          "sde_bpd": row["sde_bpd"]}))
    elif mode == "eval_bpd":
      report = run.evaluate(config, workdir)
      print(f"{report['dataset']} {report['split']}: {report['bpd']:.4f} +- "
            f"{report['bpd_stderr']:.4f} bits/dim ({report['dequantization']}, "
            f"K={report['num_importance']}, {report['num_images']} images, "
            f"NFE {report['nfe_mean']:.0f}); sde_bpd {report['sde_bpd']:.4f}")
    elif mode == "sample":
      out = run.sample(config, workdir)
      print(f"wrote {out}")
    elif mode == "import_official":
      from diffode_jax import official

      report = official.import_checkpoint(config, workdir, official_checkpoint)
      print(f"imported {report['source']} (step {report['step']}, {report['params']:,} "
            f"params; {report['optimizer']}) into {workdir}")
    else:
      raise ConfigError(f"unknown mode {mode!r}")
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
