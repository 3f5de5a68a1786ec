"""Where the files of a workdir are (SPEC 8), and which workdirs are supported.

    <workdir>/config.json            the finalized config of the run
    <workdir>/checkpoints/<step>/    orbax checkpoints
    <workdir>/metrics.jsonl          one JSON object per logged step
    <workdir>/tensorboard/           TensorBoard events
    <workdir>/eval/                  bpd.json and per_image.jsonl of --mode=eval_bpd
    <workdir>/samples/               grid.png, samples.npz, sample.json of --mode=sample

Both the library (``api.load``, checkpoint restores) and the runner (``run/``) take their
paths from here.
"""

from __future__ import annotations

import os

from diffode_jax.errors import WorkdirError


def check_supported(workdir: str) -> None:
  """Raises WorkdirError for a URL workdir (gs://...): files here go through the local file
  system, which would silently write a local folder named 'gs:' instead."""
  if "://" in workdir:
    raise WorkdirError(
        f"workdir {workdir!r}: URL workdirs are not supported yet; use a local path (on a "
        "Cloud TPU VM, a bucket mounted with gcsfuse is one)")


def expand(workdir: str) -> str:
  """The workdir with a leading ~ expanded (the shell leaves --workdir=~/x alone)."""
  return os.path.expanduser(workdir)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, "metrics.jsonl")


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, "tensorboard")


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval")


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, "samples")
