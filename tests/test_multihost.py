"""Several devices and hosts on one machine: training, evaluation and sampling.

Training: 2 processes x 2 CPU devices match 1 process x 4 devices. The two processes
meet through jax.distributed (main.py --coordinator_address ...) and use gloo for CPU
collectives; each feeds its half of every global batch. Only process 0 writes
metrics.jsonl and config.json; both take part in the orbax save.

Evaluation and sampling of one checkpoint trained here: 4 devices and 2 processes x 2
devices give the per-image bits/dim of one device (within 1e-3), including a last batch
padded to the device count; the solve holds a quarter of each batch per device; a
killed 2-process evaluation resumes where it stopped; sampling on 4 devices draws
distinct images.

The checkpoint is 3 steps at a small learning rate, on purpose. Several devices compile
other per-device programs than one device, whose roundoff differs (~1e-6), and the
adaptive step-size control turns any such difference into a slightly different step
sequence, so two runs agree only to the accuracy of the solve. The drift of a tiny
network trained for hundreds of steps oscillates in gamma (its time embedding has a
period of 0.08 in gamma) and the solver aliases it: its per-image bounds then move by
0.01-0.2 bits/dim under a 1e-7 relative change of the start state, on one device too
(README, "Evaluation on several devices"). This one stays within 3e-5 at rtol 1e-4.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import procs
from diffode_jax import run

pytestmark = pytest.mark.subprocess

# 22 images in batches of 8: the last batch (6) is padded to 8 on 4 devices.
EVAL = {"eval.batch_size": 8, "eval.num_images": 22, "eval.rtol": 1e-4, "eval.atol": 1e-4,
        "sample.num_samples": 6, "sample.batch_size": 4, "sample.rtol": 1e-3,
        "sample.atol": 1e-3}
TRAIN = {"training.num_steps": 3, "training.warmup_steps": 100,
         "training.checkpoint_every": 3}


def _fields(**fields) -> dict:
  """TRAIN and EVAL (a__b=value keys), updated by fields."""
  return {**{k.replace(".", "__"): v for k, v in {**TRAIN, **EVAL}.items()}, **fields}


def _flags(**fields):
  return procs.overrides(**_fields(**fields))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with the checkpoint of a 3-step run (trained in this process)."""
  workdir = str(tmp_path_factory.mktemp("multihost") / "trained")
  run.train(procs.config(**_fields()), workdir)
  return workdir


def _copy(trained, tmp_path, name):
  target = str(tmp_path / name)
  shutil.copytree(trained, target)
  return target


def _finish_all(proc_list, timeout=300):
  outputs = []
  for proc in proc_list:
    out, err = procs.finish(proc, timeout)
    procs.check_ok(proc.returncode, err)
    outputs.append((out, err))
  return outputs


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  flags = procs.overrides(training__num_steps=3, training__checkpoint_every=2)
  hosts = procs.start_hosts(tmp_path / "two_hosts", *flags)
  single = procs.start(tmp_path / "one_host", *flags, devices=4)
  _finish_all(hosts + [single], timeout=240)

  procs.assert_same_run(tmp_path / "one_host", tmp_path / "two_hosts")
  assert procs.checkpoint_steps(tmp_path / "two_hosts") == [2, 3]
  # Process 0 alone wrote the logs: one row per step, no stray files of process 1.
  assert [r["step"] for r in procs.read_metrics(tmp_path / "two_hosts")] == [1, 2, 3]
  assert not [n for n in os.listdir(tmp_path / "two_hosts") if n.startswith(".write_test")]


def test_eval_on_four_devices_and_two_hosts_gives_the_one_device_bounds(trained, tmp_path):
  one, four, hosts = (_copy(trained, tmp_path, n) for n in ("one", "four", "hosts"))
  flags = _flags()
  running = [procs.start(four, *flags, devices=4, mode="eval_bpd")]
  running += procs.start_hosts(hosts, *flags, mode="eval_bpd")
  reference = run.evaluate(procs.config(**_fields()), one)
  outputs = _finish_all(running)
  # Every process prints the report of process 0.
  assert outputs[1][0].splitlines()[-1] == outputs[2][0].splitlines()[-1]
  # Each host loaded only its devices' rows: batches of 8 over 2 hosts x 2 devices give
  # host 0 rows 0-3, 8-11, 16-19 and host 1 rows 4-7, 12-15 and 20-21 (the last batch,
  # 16-21, is padded with copies of row 21).
  assert "process 0 of 2 loaded 12 of the 22 images of digits/test" in outputs[1][1]
  assert "process 1 of 2 loaded 10 of the 22 images of digits/test" in outputs[2][1]
  assert "loaded" not in outputs[0][1]  # one process holds everything

  want = procs.per_image_rows(one)
  assert reference["num_devices"] == 1 and reference["precision"] == "highest"
  written = json.load(open(os.path.join(trained, "config.json")))
  assert (written["eval"]["precision"], written["training"]["precision"]) == ("highest",
                                                                              "default")
  for workdir, devices, processes in ((four, 4, 1), (hosts, 4, 2)):
    rows = procs.per_image_rows(workdir)
    assert [r["index"] for r in rows] == list(range(22))
    # The solve's accuracy, not roundoff (see the module docstring).
    np.testing.assert_allclose([r["bpd"] for r in rows], [r["bpd"] for r in want],
                               rtol=0, atol=1e-3)
    np.testing.assert_allclose([r["sde_bpd"] for r in rows], [r["sde_bpd"] for r in want],
                               rtol=0, atol=1e-5)
    report = json.load(open(os.path.join(workdir, "eval", "bpd.json")))
    assert (report["num_devices"], report["num_processes"]) == (devices, processes)
    assert report["num_images"] == 22 and report["precision"] == "highest"
    names = sorted(os.listdir(os.path.join(workdir, "eval")))
    assert names[:3] == ["bpd.json", "index.json", "per_image.jsonl"] and len(names) == 4
    assert report["evaluation"] == names[3]


# The solve of one batch of 8 on 4 devices: its compiled (partitioned) program must
# carry the ODE state as 2 images per device, never the whole batch.
_SHARDING_CHECK = r"""
import sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
import procs
from diffode_jax import data, keys, parallel
from diffode_jax.config import eval_settings, finalize_config
from diffode_jax.likelihood import make_log_prob_fn
from diffode_jax.placement import place_batch
from diffode_jax.model import build
config = finalize_config(procs.config(eval__batch_size=8))
c = build(config)
mesh = parallel.make_mesh()
log_prob = make_log_prob_fn(c.drift, c.schedule, c.num_levels, eval_settings(config), mesh)
images = data.load_split(config.data, "test").images
k, num_real = place_batch(images, 0, 8, mesh)
assert num_real is None or num_real == 8
assert [s.data.shape[0] for s in k.addressable_shards] == [2, 2, 2, 2]
params = parallel.replicate(c.init_params(jax.random.PRNGKey(0)),
                            parallel.replicated_sharding(mesh))
compiled = log_prob.solve.lower(params, k, keys.eval_key(config), None).compile()
print(compiled.input_shardings[0][1].spec == jax.sharding.PartitionSpec("data"))
text = compiled.as_text()
print(sum(" while(" in l and "f32[2,8,8,1]" in l for l in text.splitlines()))
print(text.count("f32[8,8,8,1]"))
"""


def test_the_solve_holds_a_quarter_of_the_batch_per_device():
  result = subprocess.run(
      [sys.executable, "-c", _SHARDING_CHECK.format(tests=os.path.dirname(__file__))],
      cwd=procs.REPO, env=procs.env(4), capture_output=True, text=True, timeout=240)
  procs.check_ok(result.returncode, result.stderr)
  spec, loops, whole = result.stdout.splitlines()[-3:]
  assert spec == "True"  # the images enter the solve split over the 4 devices
  assert int(loops) >= 1  # diffrax's while loops carry (2, 8, 8, 1) states
  assert int(whole) == 0  # and no (8, 8, 8, 1) array exists anywhere in the program


def _initial_count(stderr: str) -> int:
  """The image count the first progress line of eval_bpd starts at."""
  match = re.search(r"eval_bpd:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", stderr)
  assert match, stderr[-2000:]
  return int(match.group(1))


def test_a_killed_two_host_evaluation_resumes_without_redoing_batches(trained, tmp_path):
  workdir = _copy(trained, tmp_path, "killed")
  flags = _flags(eval__batch_size=4, eval__num_images=160)
  first = procs.start_hosts(workdir, *flags, mode="eval_bpd")
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:  # until process 0 has written two batches
    if len(procs.per_image_rows(workdir)) >= 8:
      break
    assert all(p.poll() is None for p in first), "the evaluation ended before the kill"
    time.sleep(0.05)
  for proc in first:
    proc.kill()
  for proc in first:
    proc.communicate()
  done = len(procs.per_image_rows(workdir))
  assert 8 <= done < 160, done

  second = procs.start_hosts(workdir, *flags, mode="eval_bpd")
  (_, err0), _ = _finish_all(second)
  assert _initial_count(err0) == done - done % 4  # whole batches kept, none recomputed
  rows = procs.per_image_rows(workdir)
  assert [r["index"] for r in rows] == list(range(160))
  assert all(np.isfinite(r["bpd"]) for r in rows)


def test_sample_on_four_devices_writes_distinct_images(trained, tmp_path):
  workdir = _copy(trained, tmp_path, "sample")
  _finish_all([procs.start(workdir, *_flags(), devices=4, mode="sample")])
  with np.load(os.path.join(workdir, "samples", "samples.npz")) as npz:
    images = npz["images"]
  assert images.shape == (6, 8, 8, 1)
  assert len({image.tobytes() for image in images}) == 6
  report = json.load(open(os.path.join(workdir, "samples", "sample.json")))
  assert report["num_devices"] == 4 and report["precision"] == "highest"


def test_a_held_eval_lock_stops_every_host_with_one_line(trained, tmp_path):
  # Process 0 alone takes eval/.lock; when it cannot, the other process must not be left
  # waiting for it in a collective.
  from diffode_jax.run.lock import WorkdirLock

  workdir = _copy(trained, tmp_path, "locked")
  with WorkdirLock(os.path.join(workdir, "eval", ".lock"), "eval_bpd"):
    running = procs.start_hosts(workdir, *_flags(), mode="eval_bpd")
    for proc in running:
      _, err = procs.finish(proc, timeout=240)
      assert proc.returncode == 1, err
      lines = procs.error_lines(err)
      assert len(lines) == 1 and "in use by another" in lines[0], err
  assert not os.path.exists(os.path.join(workdir, "eval", "per_image.jsonl"))
