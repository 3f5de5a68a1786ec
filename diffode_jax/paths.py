"""Where the files of a workdir are (docs/design.md, The workdir), and which workdirs are supported.

    <workdir>/config.json            the finalized config of the run
    <workdir>/checkpoints/<step>/    orbax checkpoints
    <workdir>/metrics.jsonl          one JSON object per logged step
    <workdir>/tensorboard/           TensorBoard events
    <workdir>/import.json            what --mode=import_official imported
    <workdir>/.train.lock            held by the training run (run/lock.py)
    <workdir>/eval/<name>/           bpd.json and per_image.jsonl of one --mode=eval_bpd
    <workdir>/eval/index.json        every evaluation by name, and the latest finished one
    <workdir>/eval/bpd.json          copies of the latest finished evaluation's two files
    <workdir>/eval/per_image.jsonl
    <workdir>/eval/.lock             held by a running evaluation
    <workdir>/samples/               grid.png, samples.npz, sample.json of --mode=sample

Every name above is written in this file only.

A workdir is a local directory or a Cloud Storage prefix (``gs://bucket/run``); the files
themselves are read and written through ``diffode_jax.storage``. Both the library
(``api.load``, checkpoint restores) and the runner (``run/``) take their paths from here.
"""

from __future__ import annotations

import json
import os

from diffode_jax import storage
from diffode_jax.errors import WorkdirError


def check_supported(workdir: str) -> None:
  """Raises WorkdirError (one line naming the workdir) for a URL other than gs://, and for
  a gs:// workdir whose bucket does not exist or cannot be read."""
  reason = storage.unsupported(workdir) or storage.check_bucket(workdir)
  if reason:
    raise WorkdirError(f"workdir {workdir!r}: {reason}")


def expand(workdir: str) -> str:
  """The workdir with a leading ~ expanded (the shell leaves --workdir=~/x alone)."""
  return os.path.expanduser(workdir)


def config_path(workdir: str) -> str:
  return storage.join(workdir, "config.json")


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), "checkpoints")


def metrics_path(workdir: str) -> str:
  return storage.join(workdir, "metrics.jsonl")


def tensorboard_dir(workdir: str) -> str:
  return storage.join(workdir, "tensorboard")


def import_report_path(workdir: str) -> str:
  return storage.join(workdir, "import.json")


def train_lock_path(workdir: str) -> str:
  return storage.join(workdir, ".train.lock")


def eval_dir(workdir: str) -> str:
  return storage.join(workdir, "eval")


def eval_lock_path(workdir: str) -> str:
  return storage.join(workdir, "eval", ".lock")


def eval_report_path(workdir: str, name: str | None = None) -> str:
  """bpd.json of the evaluation ``name``, or (None) the copy of the latest finished one."""
  return storage.join(eval_dir(workdir) if name is None else evaluation_dir(workdir, name),
                      "bpd.json")


def eval_rows_path(workdir: str, name: str | None = None) -> str:
  """per_image.jsonl of the evaluation ``name``, or (None) the copy of the latest finished
  one."""
  return storage.join(eval_dir(workdir) if name is None else evaluation_dir(workdir, name),
                      "per_image.jsonl")


def evaluation_dir(workdir: str, name: str) -> str:
  """The directory of one named evaluation (``run.eval_rows.evaluation_name``)."""
  return storage.join(workdir, "eval", name)


def eval_index_path(workdir: str) -> str:
  return storage.join(workdir, "eval", "index.json")


def read_eval_index(workdir: str) -> dict:
  """eval/index.json: {"latest": name or None, "evaluations": {name: entry}} (empty when
  the workdir has no evaluation yet)."""
  path = eval_index_path(workdir)
  if not storage.exists(path):
    return {"latest": None, "evaluations": {}}
  return json.loads(storage.read_text(path))


def samples_dir(workdir: str) -> str:
  return storage.join(workdir, "samples")


def sample_grid_path(workdir: str) -> str:
  return storage.join(samples_dir(workdir), "grid.png")


def samples_path(workdir: str) -> str:
  return storage.join(samples_dir(workdir), "samples.npz")


def sample_report_path(workdir: str) -> str:
  return storage.join(samples_dir(workdir), "sample.json")
