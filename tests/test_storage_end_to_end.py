"""A workdir end to end on both kinds of storage, local and gs:// (the session's Cloud
Storage emulator, tests/gcs_emulator.py): train with kill -9 and resume (on gs:// by two
processes sharing the workdir, as the hosts of a pod slice do), eval_bpd killed and
resumed, sample, dj.load and training.init_from; and a kill during a checkpoint save on
gs://.

The subprocesses of the gs:// runs join the emulator's network namespace where the test
may create one (``Storage.prefix``): they can reach nothing but the emulator.
"""

import io
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import diffode_jax as dj
import procs
from diffode_jax import cli, paths, run, storage
from diffode_jax.checkpoint import Checkpointer
from diffode_jax.run import eval_rows

pytestmark = pytest.mark.subprocess

NUM_STEPS = 24
EVAL_IMAGES, EVAL_BATCH = 48, 8
FIELDS = dict(
    training__num_steps=NUM_STEPS, training__checkpoint_every=4, training__tensorboard=True,
    eval__batch_size=EVAL_BATCH, eval__num_images=EVAL_IMAGES, eval__rtol=1e-4,
    eval__atol=1e-4, sample__num_samples=4, sample__batch_size=4, sample__rtol=1e-3,
    sample__atol=1e-3)


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL


def _per_image_rows(workdir):
  try:
    path = eval_rows.newest_rows_path(workdir)
    return [] if path is None else storage.read_jsonl(path)[1:]
  except (OSError, ValueError):  # being replaced (local rename)
    return []


def test_workdir_end_to_end(storage_root, monkeypatch):
  workdir = storage_root / "run"
  flags = procs.overrides(**FIELDS)
  config = procs.config(**FIELDS)
  prefix = storage_root.prefix

  # 1. Train; kill -9 as soon as a checkpoint is committed.
  victim = procs.start(workdir, *flags, prefix=prefix)
  procs.wait_for(lambda: procs.checkpoint_steps(workdir), victim, what="a checkpoint")
  _kill(victim)
  killed_at = procs.checkpoint_steps(workdir)[-1]
  assert killed_at < NUM_STEPS

  # 2. Resume to the end. In a bucket by two processes (the hosts of a pod slice: they
  # restore and save together, process 0 alone writes the logs); two processes on a
  # local disk are test_multihost.py's (a multi-process run costs ~20 s more).
  if storage_root.kind == "gs":
    address = f"127.0.0.1:{procs.free_port()}"
    hosts = [procs.start(workdir, *flags, f"--coordinator_address={address}",
                         "--num_processes=2", f"--process_id={i}", prefix=prefix)
             for i in range(2)]
  else:
    hosts = [procs.start(workdir, *flags, prefix=prefix)]
  for proc in hosts:
    _, err = procs.finish(proc)
    procs.check_ok(proc.returncode, err)
  assert procs.checkpoint_steps(workdir)[-1] == NUM_STEPS
  rows = procs.read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))  # each step once
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert not [n for n in storage.listdir(workdir) if n.startswith(".write_test")]
  # TensorBoard: both runs' event files, every step (the killed run's up to its last
  # checkpoint, flushed before it), readable by TensorBoard's loader.
  scalars = procs.read_scalars(workdir)
  assert set(range(1, NUM_STEPS + 1)) <= set(scalars["loss"])
  assert scalars["loss"][NUM_STEPS] == pytest.approx(rows[-1]["loss"], rel=1e-6)

  # 3. eval_bpd: kill -9 after its first batch, then resume: the finished batches stay.
  victim = procs.start(workdir, *flags, mode="eval_bpd", prefix=prefix)
  procs.wait_for(lambda: len(_per_image_rows(workdir)) >= EVAL_BATCH, victim,
            what="the first evaluated batch")
  _kill(victim)
  kept = _per_image_rows(workdir)
  assert EVAL_BATCH <= len(kept) < EVAL_IMAGES, len(kept)
  assert not storage.exists(storage.join(paths.eval_dir(workdir), "bpd.json"))
  computed = procs.count_evaluated_batches(monkeypatch)
  assert cli.dispatch(config, workdir, "eval_bpd") == 0
  assert computed == list(range(len(kept), EVAL_IMAGES, EVAL_BATCH))
  final = _per_image_rows(workdir)
  assert [r["index"] for r in final] == list(range(EVAL_IMAGES)) and final[:len(kept)] == kept
  report = json.loads(storage.read_text(storage.join(paths.eval_dir(workdir), "bpd.json")))
  assert report["checkpoint_step"] == NUM_STEPS and report["num_images"] == EVAL_IMAGES

  # 4. sample
  assert cli.dispatch(config, workdir, "sample") == 0
  samples_dir = paths.samples_dir(workdir)
  with np.load(io.BytesIO(storage.read_bytes(storage.join(samples_dir, "samples.npz")))) as npz:
    assert npz["images"].shape == (4, 8, 8, 1)
  from PIL import Image

  with Image.open(io.BytesIO(storage.read_bytes(storage.join(samples_dir, "grid.png")))) as g:
    assert g.size == (2 * 65 + 1, 2 * 65 + 1)

  # 5. The Python API
  model = dj.load(workdir)
  saved = procs.load_checkpoint(workdir)
  assert model.step == NUM_STEPS and model.config.training.num_steps == NUM_STEPS
  procs.assert_trees_close(model.params, saved["ema_params"], rtol=0, atol=0)

  # 6. A fine-tune from it: step 1 has learning rate 0 (warm-up), so its params are the
  # source's exactly.
  finetune = storage_root / "finetune"
  run.train(procs.config(**{**FIELDS, "training__init_from": workdir,
                            "training__num_steps": 1, "training__tensorboard": False}),
            finetune)
  procs.assert_trees_close(procs.load_checkpoint(finetune)["params"], saved["params"],
                           rtol=0, atol=0)


def _small_state(scale=1.0):
  return {"params": {"w": np.full((64, 64), scale, np.float32)},
          "step": np.asarray(3, np.int32)}


def test_kill_during_a_checkpoint_save_on_gs_keeps_the_previous_step(gs_root):
  """On gs:// orbax writes a step in place and commits it by writing commit_success.txt
  last: a step killed before that is ignored, and the next writer deletes it. (Locally:
  test_resume.py's test_interrupted_save_is_never_the_latest_checkpoint.)"""
  storage_root = gs_root
  directory = storage_root / "checkpoints"
  ckpt = Checkpointer(directory)
  ckpt.save(1, _small_state())
  ckpt.close()

  script = procs.large_save_script(directory)
  proc = subprocess.Popen([*storage_root.prefix, sys.executable, "-c", script],
                          cwd=procs.REPO, env=procs.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  step_2 = storage.join(directory, "2")
  procs.wait_for(lambda: storage.isdir(step_2), proc, timeout=120, what="the save to start")
  _kill(proc)
  if storage.exists(storage.join(step_2, "commit_success.txt")):
    pytest.skip("the 256 MB save completed before SIGKILL; nothing interrupted")

  reader = Checkpointer(directory, create=False)
  assert reader.latest_step() == 1 and reader.all_steps() == [1]
  restored = reader.restore(_small_state(0.0))
  reader.close()
  np.testing.assert_array_equal(restored["params"]["w"], _small_state()["params"]["w"])
  writer = Checkpointer(directory)  # what a resumed run opens: it deletes the leftover
  writer.save(3, _small_state(2.0))
  writer.close()
  assert storage.listdir(directory) == ["1", "3"]
