"""The bits/dim report: one definition of its fields, shared by ``eval/bpd.json`` and the
Python API's ``Model.bpd`` (docs/evaluation.md: per-image results summarized with the settings that
produced them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from diffode_jax import ode
from diffode_jax.evaluation import START_PERTURBATION
from diffode_jax.likelihood import EvalSettings, start_gamma
from diffode_jax.schedules import Schedule


def settings_report(settings: EvalSettings, schedule: Schedule) -> dict[str, Any]:
  """The settings fields of a report (eval/bpd.json and the Python API).

  rtol and atol are the configured ones; the solver ran with them times ode.tolerance_scale.
  """
  return {"dequantization": settings.dequantization,
          "num_importance": settings.num_importance,
          "analytic_entropy": settings.analytic_entropy,
          "divergence": settings.divergence, "solver": settings.solver.solver,
          "rtol": settings.solver.rtol, "atol": settings.solver.atol,
          "tolerance_scale": ode.tolerance_scale(start_gamma(settings, schedule)),
          "precision": settings.precision}


def mean_and_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
  """Mean and standard error of the mean (0 for a single value)."""
  values = np.asarray(values, np.float64)
  stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
  return float(values.mean()), float(stderr)


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
  """Mean and standard error of bpd (and sde_bpd when present), mean NFE, image count."""
  out: dict[str, Any] = {"num_images": len(rows)}
  out["bpd"], out["bpd_stderr"] = mean_and_stderr([r["bpd"] for r in rows])
  if rows and "sde_bpd" in rows[0]:
    out["sde_bpd"], out["sde_bpd_stderr"] = mean_and_stderr([r["sde_bpd"] for r in rows])
  out["nfe_mean"] = float(np.mean([r["nfe"] for r in rows]))
  return out


# A per-image bound that moves by more than this (bits/dim) when its start moves by one
# rounding step is not reproducible at the evaluation's tolerance: the report warns.
REPRODUCIBLE_BPD = 0.01


def start_sensitivity(rows: Sequence[dict]) -> dict[str, Any] | None:
  """How far the bounds of the checked rows moved when z0 moved by
  ``START_PERTURBATION`` (median, largest, count), or None if none was checked."""
  moved = [r["start_sensitivity_bpd"] for r in rows if "start_sensitivity_bpd" in r]
  if not moved:
    return None
  return {"images": len(moved), "median_bpd": float(np.median(moved)),
          "max_bpd": float(np.max(moved)), "reproducible": bool(np.max(moved) <= REPRODUCIBLE_BPD)}


def sensitivity_warning(summary: dict[str, Any] | None, solver: ode.SolverConfig) -> str | None:
  """The one-line warning of a report whose bounds are not reproducible, else None."""
  if summary is None or summary["reproducible"]:
    return None
  return (f"per-image bounds are not reproducible at rtol={solver.rtol:g}, atol="
          f"{solver.atol:g}: moving the start by "
          f"{START_PERTURBATION:g} per component moved a bound by up to "
          f"{summary['max_bpd']:.3g} bits/dim (median {summary['median_bpd']:.2g}, "
          f"{summary['images']} images); per-image values are uncertain by about that much, "
          f"tighten eval.rtol/eval.atol (docs/evaluation.md, Reproducibility)")


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What defines the model being evaluated (every report names it)."""
  m = config.model
  return {"arch": m.arch, "schedule": m.schedule, "parameterization": m.parameterization,
          "gamma_min": m.gamma_min, "gamma_max": m.gamma_max}


def run_fields(config: ml_collections.ConfigDict, settings: EvalSettings, schedule: Schedule,
               checkpoint_step: int | None, batch_size: int) -> dict[str, Any]:
  """Every field that changes a per-image row: the model, the checkpoint, the settings,
  the batch size (which fixes the keys of each image) and the seed."""
  fields = {"checkpoint_step": checkpoint_step, "batch_size": int(batch_size),
            "seed": config.seed}
  fields.update(model_fields(config))
  fields.update(settings_report(settings, schedule))
  fields["gamma_u"] = settings.gamma_u if settings.dequantization == "u" else None
  return fields


def devices_fields(num_devices: int, num_processes: int = 1) -> dict[str, int]:
  """How many devices (of how many processes) the solves ran on."""
  return {"num_devices": int(num_devices), "num_processes": int(num_processes)}


def bpd_report(fields: dict[str, Any], rows: Sequence[dict], wall_time_s: float,
               **extra: Any) -> dict[str, Any]:
  """The report: ``fields`` (from ``run_fields``), the summary of ``rows``, wall time and
  any extra fields (dataset, split, ...)."""
  report = dict(fields)
  report.update(extra)
  report.update(summarize(rows))
  sensitivity = start_sensitivity(rows)
  if sensitivity is not None:
    report["start_sensitivity"] = sensitivity
  report["wall_time_s"] = wall_time_s
  return report
