"""Helpers for tests that run main.py in subprocesses (devices, hosts, kills, bad input)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")

# What main.py subprocesses add to tiny.TINY: no attention, no TensorBoard.
SUBPROCESS = {
    "model.attention": False,
    "training.tensorboard": False,  # spares each subprocess the TensorFlow import
}


def overrides(**fields) -> list[str]:
  """--config.<a.b>=value flags: tiny.TINY + SUBPROCESS updated by fields (a__b=value)."""
  return tiny.flags(SUBPROCESS, **fields)


def config(**fields):
  """The in-process ConfigDict of ``overrides(**fields)`` (digits + TINY + SUBPROCESS)."""
  return tiny.config(SUBPROCESS, **fields)


def env(devices: int = 1) -> dict:
  """The environment of a subprocess with ``devices`` fake CPU devices."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return e


def main_command(workdir, *flags, mode="train", config="configs/digits.py") -> list[str]:
  return [sys.executable, MAIN, f"--config={os.path.join(REPO, config)}",
          f"--workdir={workdir}", f"--mode={mode}", *flags]


def _interruptible() -> None:
  """In the child before exec: SIGINT back to its default. A suite started in the
  background of a non-interactive shell (``make test &``, some CI runners) inherits SIGINT
  ignored, and a Python started so never raises KeyboardInterrupt; the tests that send
  SIGINT stand for a user pressing Ctrl-C in a terminal."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(workdir, *flags, devices=1, mode="train", stderr=subprocess.PIPE, prefix=()):
  """main.py in a subprocess; ``prefix`` goes before the command (e.g. the nsenter of the
  Cloud Storage emulator's network namespace, ``conftest.Storage.prefix``)."""
  return subprocess.Popen([*prefix, *main_command(workdir, *flags, mode=mode)], cwd=REPO,
                          env=env(devices), stdout=subprocess.PIPE, stderr=stderr, text=True,
                          preexec_fn=_interruptible)


def start_hosts(workdir, *flags, processes=2, devices=2, mode="train") -> list:
  """``processes`` main.py processes of one multi-host run (jax.distributed over a free
  local port), each with ``devices`` fake CPU devices; process 0 first in the list."""
  address = f"127.0.0.1:{free_port()}"
  return [start(workdir, *flags, f"--coordinator_address={address}",
                f"--num_processes={processes}", f"--process_id={i}", devices=devices,
                mode=mode)
          for i in range(processes)]


def run(workdir, *flags, devices=1, mode="train", timeout=240,
        prefix=()) -> subprocess.CompletedProcess:
  return subprocess.run([*prefix, *main_command(workdir, *flags, mode=mode)], cwd=REPO,
                        env=env(devices), capture_output=True, text=True, timeout=timeout)


def finish(proc: subprocess.Popen, timeout=240) -> tuple[str, str]:
  """Waits for proc; kills it on timeout; returns (stdout, stderr)."""
  try:
    return proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"subprocess timed out; stderr tail: {err[-2000:]}") from None


def check_ok(returncode: int, stderr: str):
  assert returncode == 0, f"exit {returncode}; stderr tail:\n{stderr[-3000:]}"


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.strip()]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def rows_path(workdir):
  """per_image.jsonl of the evaluation started last (eval/index.json), or None."""
  from diffode_jax.run import eval_rows

  try:
    return eval_rows.newest_rows_path(os.fspath(workdir))
  except (OSError, ValueError):  # index.json being replaced
    return None


def per_image_rows(workdir) -> list[dict]:
  """The rows of the evaluation started last (its header line dropped; [] before any)."""
  path = rows_path(workdir)
  if path is None or not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(l) for l in f if l.strip().endswith("}")]
  return lines[1:]


def read_metrics(workdir) -> list[dict]:
  """metrics.jsonl's rows (local or gs://)."""
  from diffode_jax import storage

  text = storage.read_text(storage.join(os.fspath(workdir), "metrics.jsonl"))
  return [json.loads(l) for l in text.splitlines() if l.strip()]


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def checkpoint_steps(workdir) -> list[int]:
  """The committed checkpoint steps of a workdir (the store's own listing)."""
  from diffode_jax import paths
  from diffode_jax.checkpoint import committed_steps

  return committed_steps(paths.checkpoint_dir(os.fspath(workdir)))


def load_checkpoint(workdir, step=None) -> dict:
  """The saved state dict of a step (latest by default) as NumPy arrays, read with orbax."""
  import orbax.checkpoint as ocp

  import jax
  from diffode_jax import paths

  manager = ocp.CheckpointManager(paths.checkpoint_dir(os.fspath(workdir)),
                                  options=ocp.CheckpointManagerOptions(create=False),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = manager.latest_step() if step is None else step
    # The saved sharding may name devices this process lacks: restore onto one device.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step).tree)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    manager.close()
  return jax.tree.map(np.asarray, restored)


def read_scalars(workdir) -> dict:
  """{tag: {step: value}} of every TensorBoard event file in workdir/tensorboard (local or
  gs://), read by TensorBoard's own loader (which checks the records' checksums) from a
  local copy."""
  import tempfile

  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2

  from diffode_jax import storage

  directory = storage.join(os.fspath(workdir), "tensorboard")
  scalars = {}
  with tempfile.TemporaryDirectory() as local:
    for name in storage.listdir(directory):
      copy = os.path.join(local, name)
      with open(copy, "wb") as f:
        f.write(storage.read_bytes(storage.join(directory, name)))
      for record in event_file_loader.RawEventFileLoader(copy).Load():
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  import jax

  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def assert_same_run(dir_a, dir_b, steps=(1, 2, 3)):
  """Two training workdirs logged the same losses at the same steps and saved the same
  final parameters (to float tolerance)."""
  a, b = losses(dir_a), losses(dir_b)
  assert sorted(a) == sorted(b) == list(steps)
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
  assert_trees_close(load_checkpoint(dir_a), load_checkpoint(dir_b), rtol=1e-4, atol=1e-6)


def wait_for(predicate, proc, timeout=240.0, what="", poll=0.02):
  """Polls predicate() until it is true; AssertionError if proc ends or time runs out."""
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      _, err = proc.communicate()
      raise AssertionError(f"process ended (exit {proc.returncode}) before {what}:\n"
                           f"{err[-2000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(poll)


def snapshot(root):
  """{relative path: sha1} of every file under root (None if root does not exist)."""
  if not os.path.exists(root):
    return None
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return out


def count_evaluated_batches(monkeypatch) -> list:
  """Patches run/evaluate's evaluate_batches to record the first image index of every
  batch it computes; returns that (growing) list."""
  import importlib

  computed = []
  evaluate_module = importlib.import_module("diffode_jax.run.evaluate")
  original = evaluate_module.evaluate_batches

  def counting(*args, **kwargs):
    for batch in original(*args, **kwargs):
      computed.append(batch[0]["index"])
      yield batch

  monkeypatch.setattr(evaluate_module, "evaluate_batches", counting)
  return computed


def large_save_script(directory: str) -> str:
  """Python source that saves a 256 MiB step 2 with the project's Checkpointer into
  ``directory``, printing "saving" first (to be killed during the save)."""
  import textwrap

  return textwrap.dedent(f"""
      import numpy as np
      from diffode_jax.checkpoint import Checkpointer
      ckpt = Checkpointer({str(directory)!r})
      big = {{"params": {{f"w{{i}}": np.random.rand(1024, 1024).astype(np.float32)
                          for i in range(64)}}, "step": np.asarray(2, np.int32)}}
      print("saving", flush=True)
      ckpt.save(2, big)
  """)
