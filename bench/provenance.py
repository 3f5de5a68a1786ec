"""What a results file was produced with: the code's commit and the network layout."""

from __future__ import annotations

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))

# The network fields a result depends on (a layout whose GroupNorm removes the time input
# gives other numbers): results files record them and merge only results of one layout.
NETWORK_FIELDS = ("channels", "num_groups", "num_blocks", "embed_dim", "attention", "dropout",
                 "fourier_min", "fourier_max", "time_proj", "cond_input")


def commit() -> str:
  """The code's git commit (with "+changes" for uncommitted edits), or "unknown"."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=HERE, text=True, capture_output=True, check=True).stdout
    return head + ("+changes" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def network(model_config) -> dict:
  """The NETWORK_FIELDS of a config's ``model`` section."""
  return {name: model_config[name] for name in NETWORK_FIELDS}


def describe(model_config) -> str:
  """One line for a results header: "network: channels 32, num_groups 8, ..."."""
  return "network: " + ", ".join(f"{k} {v}" for k, v in network(model_config).items())
