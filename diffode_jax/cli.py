"""Dispatch for main.py: runs a mode and turns every DiffodeError into one stderr line.

Each mode is one row of ``MODES``: the function that runs it and the line it prints. A new
mode is a new row (and a new choice of ``--mode`` in main.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable

import ml_collections

from diffode_jax.errors import ConfigError, DiffodeError


def _train(config: ml_collections.ConfigDict, workdir: str,
           command_line_fields: set[str] | None, official_checkpoint: str | None) -> str:
  from diffode_jax import run

  row = run.train(config, workdir, command_line_fields)
  if row.get("nothing_to_do"):
    return (f"nothing to train: {workdir} is at step {row['step']} already "
            f"(training.num_steps)")
  if row and "loss" in row:  # (a run stopped before its first step has none)
    return json.dumps({"step": row["step"], "loss_bpd": row["loss"],
                       "sde_bpd": row["sde_bpd"]})
  return ""


def _evaluate(config: ml_collections.ConfigDict, workdir: str,
              command_line_fields: set[str] | None, official_checkpoint: str | None) -> str:
  from diffode_jax import run

  report = run.evaluate(config, workdir, command_line_fields)
  return (f"{report['dataset']} {report['split']}: {report['bpd']:.4f} +- "
          f"{report['bpd_stderr']:.4f} bits/dim ({report['dequantization']}, "
          f"K={report['num_importance']}, {report['num_images']} images, "
          f"NFE {report['nfe_mean']:.0f}); sde_bpd {report['sde_bpd']:.4f}")


def _sample(config: ml_collections.ConfigDict, workdir: str,
            command_line_fields: set[str] | None, official_checkpoint: str | None) -> str:
  from diffode_jax import run

  return f"wrote {run.sample(config, workdir, command_line_fields)}"


def _import_official(config: ml_collections.ConfigDict, workdir: str,
                     command_line_fields: set[str] | None,
                     official_checkpoint: str | None) -> str:
  from diffode_jax import run

  report = run.import_official(config, workdir, official_checkpoint)
  return (f"imported {report['source']} (step {report['step']}, {report['params']:,} "
          f"params; {report['optimizer']}) into {workdir}")


@dataclasses.dataclass(frozen=True)
class Mode:
  """One --mode: ``run(config, workdir, command_line_fields, official_checkpoint)`` does
  the work and returns the line to print (empty: nothing); ``interrupted`` says what a
  Ctrl-C leaves behind."""
  run: Callable[[ml_collections.ConfigDict, str, set[str] | None, str | None], str]
  interrupted: str


MODES: dict[str, Mode] = {
    "train": Mode(_train, "the last saved checkpoint is intact; rerun to resume from it"),
    "eval_bpd": Mode(_evaluate, "the finished batches are kept in eval/ (eval/index.json "
                     "names the evaluation); rerun to resume"),
    "sample": Mode(_sample, "no samples were written; rerun to draw them"),
    "import_official": Mode(_import_official, "no checkpoint was written; rerun to import"),
}


def dispatch(config: ml_collections.ConfigDict, workdir: str, mode: str,
             command_line_fields: set[str] | None = None, *,
             official_checkpoint: str | None = None) -> int:
  """Runs mode; returns the process exit status (1 for a user error, 130 for Ctrl-C).

  ``command_line_fields``: the dotted config fields set on the command line (None: all of
  them), so a workdir's config.json can supply the rest of what defines its model.
  ``official_checkpoint``: the source of --mode=import_official.
  """
  from diffode_jax import paths

  try:
    if mode not in MODES:
      raise ConfigError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    workdir = paths.expand(workdir)
    paths.check_supported(workdir)
    line = MODES[mode].run(config, workdir, command_line_fields, official_checkpoint)
    if line:
      print(line)
  except DiffodeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # Ctrl-C (training turns the first one into a save instead)
    print(f"\ninterrupted: --mode={mode} stopped; {MODES[mode].interrupted}",
          file=sys.stderr)
    return 130
  return 0

