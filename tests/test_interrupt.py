"""Ctrl-C during an evaluation: one line, exit 130, and the finished batches kept."""

import json
import os
import signal
import time

import pytest

import procs
from diffode_jax.run import eval_rows as _eval_rows  # noqa: F401 (imported before the race)


@pytest.mark.subprocess
def test_ctrl_c_during_eval_bpd_is_one_line_and_resumable(tmp_path):
  workdir = tmp_path / "run"
  procs.check_ok(*_rc_err(procs.run(workdir, *procs.overrides(training__num_steps=2))))
  flags = procs.overrides(eval__batch_size=8, eval__num_images=256, eval__rtol=1e-5,
                          eval__atol=1e-5)
  proc = procs.start(workdir, *flags, mode="eval_bpd")
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline and proc.poll() is None:
    if len(procs.per_image_rows(workdir)) >= 8:  # one batch done
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the evaluation finished before it could be interrupted"
  proc.send_signal(signal.SIGINT)
  _, stderr = procs.finish(proc)
  assert proc.returncode == 130, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.startswith("interrupted:")]
  assert len(lines) == 1 and "eval/index.json" in lines[0], stderr[-1000:]
  kept = procs.per_image_rows(workdir)
  assert kept and not os.path.exists(os.path.join(workdir, "eval", ".lock"))


def _rc_err(result):
  return result.returncode, result.stderr
