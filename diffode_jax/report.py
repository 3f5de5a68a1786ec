"""The bits/dim report: one definition of its fields, shared by ``eval/bpd.json`` and the
Python API's ``Model.bpd`` (docs/evaluation.md: per-image results summarized with the settings that
produced them).
"""

from __future__ import annotations

from diffode_jax.likelihood import EvalSettings, settings_report, summarize
from diffode_jax.schedules import Schedule


def model_fields(config) -> dict:
  """What defines the model being evaluated (every report names it)."""
  m = config.model
  return {"arch": m.arch, "schedule": m.schedule, "parameterization": m.parameterization,
          "gamma_min": m.gamma_min, "gamma_max": m.gamma_max}


def run_fields(config, settings: EvalSettings, schedule: Schedule, checkpoint_step,
               batch_size: int) -> dict:
  """Every field that changes a per-image row: the model, the checkpoint, the settings,
  the batch size (which fixes the keys of each image) and the seed."""
  fields = {"checkpoint_step": checkpoint_step, "batch_size": int(batch_size),
            "seed": config.seed}
  fields.update(model_fields(config))
  fields.update(settings_report(settings, schedule))
  fields["gamma_u"] = settings.gamma_u if settings.dequantization == "u" else None
  return fields


def devices_fields(num_devices: int, num_processes: int = 1) -> dict:
  """How many devices (of how many processes) the solves ran on."""
  return {"num_devices": int(num_devices), "num_processes": int(num_processes)}


def bpd_report(fields: dict, rows: list, wall_time_s: float, **extra) -> dict:
  """The report: ``fields`` (from ``run_fields``), the summary of ``rows``, wall time and
  any extra fields (dataset, split, ...)."""
  report = dict(fields)
  report.update(extra)
  report.update(summarize(rows))
  report["wall_time_s"] = wall_time_s
  return report
