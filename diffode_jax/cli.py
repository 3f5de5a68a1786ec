"""Dispatch for main.py: runs a mode and turns every DiffodeError into one stderr line."""

from __future__ import annotations

import json
import sys

from diffode_jax.errors import ConfigError, DiffodeError


def dispatch(config, workdir: str, mode: str, explicit=None, *,
             official_checkpoint: str | None = None) -> int:
  """Runs mode; returns the process exit status (1 for a user error).

  ``explicit``: the dotted config fields set on the command line (None: all of them), so
  a workdir's config.json can supply the rest of what defines its model.
  ``official_checkpoint``: the source of --mode=import_official.
  """
  from diffode_jax import paths, run

  try:
    workdir = paths.expand(workdir)
    paths.check_supported(workdir)
    if mode == "train":
      row = run.train(config, workdir, explicit)
      if row.get("nothing_to_do"):
        print(f"nothing to train: {workdir} is at step {row['step']} already "
              f"(training.num_steps)")
      elif row and "loss" in row:  # (a run stopped before its first step has none)
        print(json.dumps({"step": row["step"], "loss_bpd": row["loss"],
                          "sde_bpd": row["sde_bpd"]}))
    elif mode == "eval_bpd":
      report = run.evaluate(config, workdir, explicit)
      print(f"{report['dataset']} {report['split']}: {report['bpd']:.4f} +- "
            f"{report['bpd_stderr']:.4f} bits/dim ({report['dequantization']}, "
            f"K={report['num_importance']}, {report['num_images']} images, "
            f"NFE {report['nfe_mean']:.0f}); sde_bpd {report['sde_bpd']:.4f}")
    elif mode == "sample":
      out = run.sample(config, workdir, explicit)
      print(f"wrote {out}")
    elif mode == "import_official":
      report = run.import_official(config, workdir, official_checkpoint)
      print(f"imported {report['source']} (step {report['step']}, {report['params']:,} "
            f"params; {report['optimizer']}) into {workdir}")
    else:
      raise ConfigError(f"unknown mode {mode!r}")
  except DiffodeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # Ctrl-C (training turns the first one into a save instead)
    print(f"\ninterrupted: --mode={mode} stopped; {INTERRUPTED.get(mode, 'nothing was kept')}",
          file=sys.stderr)
    return 130
  return 0


# What a run interrupted by Ctrl-C leaves behind, by mode.
INTERRUPTED = {
    "train": "the last saved checkpoint is intact; rerun to resume from it",
    "eval_bpd": ("the finished batches are kept in eval/ (eval/index.json names the "
                 "evaluation); rerun to resume"),
    "sample": "no samples were written; rerun to draw them",
    "import_official": "no checkpoint was written; rerun to import",
}
