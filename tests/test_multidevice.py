"""Data parallelism: 1 and 8 (fake CPU) devices train to the same losses and parameters.

XLA_FLAGS must be set before jax is imported, so each device count runs main.py in its
own subprocess; both start at once (they compile in parallel on the two cores). The
checkpoint written on 8 devices is then restored and continued in this 1-device process.
"""

import pytest

import procs
from diffode_jax import run
from diffode_jax.trained import restore_ema_params
from diffode_jax.config import finalize_config
from diffode_jax.model import build

pytestmark = pytest.mark.subprocess


def test_one_and_eight_devices_give_the_same_run(tmp_path):
  flags = procs.overrides(training__num_steps=3, training__checkpoint_every=3)
  one = procs.start(tmp_path / "one", *flags, devices=1)
  eight = procs.start(tmp_path / "eight", *flags, devices=8)
  for proc in (one, eight):
    _, err = procs.finish(proc)
    procs.check_ok(proc.returncode, err)

  procs.assert_same_run(tmp_path / "one", tmp_path / "eight")

  # The 8-device checkpoint serves this 1-device process: evaluation, and resuming.
  config = finalize_config(procs.config(training__num_steps=4, training__checkpoint_every=3))
  _, step = restore_ema_params(config, str(tmp_path / "eight"), build(config))
  assert step == 3
  run.train(config, str(tmp_path / "eight"))
  assert sorted(procs.losses(tmp_path / "eight")) == [1, 2, 3, 4]


@pytest.mark.parametrize("mode, field", [("train", "training.batch_size"),
                                         ("eval_bpd", "eval.batch_size"),
                                         ("sample", "sample.batch_size")])
def test_batch_not_divisible_by_devices_is_one_line(tmp_path, mode, field):
  workdir = tmp_path / "run"
  flag = field.replace(".", "__")
  result = procs.run(workdir, *procs.overrides(**{flag: 12}), devices=8, mode=mode)
  assert result.returncode == 1
  lines = procs.error_lines(result.stderr)
  assert lines == [f"error: {field}=12 is not divisible by the 8 devices "
                   "(1 process(es)); each takes an equal share"], result.stderr
  assert not workdir.exists()
