"""Multi-host on one machine: 2 processes x 2 CPU devices match 1 process x 4 devices.

The two processes meet through jax.distributed (main.py --coordinator_address ...) and
use gloo for CPU collectives; each feeds its half of every global batch. Only process 0
writes metrics.jsonl and config.json; both take part in the orbax save.
"""

import os

import pytest

import procs

pytestmark = pytest.mark.subprocess


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  flags = procs.overrides(training__num_steps=3, training__checkpoint_every=2)
  address = f"127.0.0.1:{procs.free_port()}"
  hosts = [procs.start(tmp_path / "two_hosts", *flags, f"--coordinator_address={address}",
                       "--num_processes=2", f"--process_id={i}", devices=2)
           for i in range(2)]
  single = procs.start(tmp_path / "one_host", *flags, devices=4)
  for proc in hosts + [single]:
    _, err = procs.finish(proc)
    procs.check_ok(proc.returncode, err)

  procs.assert_same_run(tmp_path / "one_host", tmp_path / "two_hosts")
  assert procs.checkpoint_steps(tmp_path / "two_hosts") == [2, 3]
  # Process 0 alone wrote the logs: one row per step, no stray files of process 1.
  assert [r["step"] for r in procs.read_metrics(tmp_path / "two_hosts")] == [1, 2, 3]
  assert not [n for n in os.listdir(tmp_path / "two_hosts") if n.startswith(".write_test")]
