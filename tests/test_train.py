"""One real training step on the bundled digits and on mock CIFAR-10; resume; eval report."""

import json
import os

import jax
import numpy as np
import pytest

from diffode_jax import run
from diffode_jax.checkpoint import Checkpointer, checkpoint_dir
from diffode_jax.model import build, finalize_config
from diffode_jax.train_state import make_optimizer


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _restore(config, workdir):
  config = finalize_config(config)
  components = build(config)
  template = run.init_state(config, components, make_optimizer(config.training))
  ckpt = Checkpointer(checkpoint_dir(workdir), create=False)
  try:
    return ckpt.restore(template), template
  finally:
    ckpt.close()


def test_digits_train_step_writes_metrics_and_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  row = run.train(tiny_config, workdir)
  assert row["step"] == 3 and np.isfinite(row["loss"])
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("loss", "diffusion_bpd", "sde_bpd", "learning_rate", "steps_per_sec"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  state, init = _restore(tiny_config, workdir)
  assert int(state.step) == 3
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       state.params, init.params))
  assert max(moved) > 0  # the optimizer changed the parameters


def test_mock_cifar10_train_step(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from configs import cifar10_velocity

  config = cifar10_velocity.get_config()
  m, t = config.model, config.training
  m.channels, m.num_blocks, m.embed_dim, m.num_groups = 8, 1, 16, 4
  t.batch_size, t.num_steps, t.log_every, t.checkpoint_every = 4, 1, 1, 1
  with tfds.testing.mock_data(num_examples=8):
    row = run.train(config, str(tmp_path / "c10"))
  assert row["step"] == 1 and np.isfinite(row["loss"])
  # the official literal in the reference config (derived -2 log(3 V) = -13.29 elsewhere)
  assert json.load(open(tmp_path / "c10" / "config.json"))["model"]["gamma_min"] == -13.3


def test_resume_continues_from_last_checkpoint(tiny_config, tmp_path):
  """A run stopped at step 2 and rerun to 4 equals an uninterrupted run to 4."""
  tiny_config.training.checkpoint_every = 2
  straight = str(tmp_path / "straight")
  tiny_config.training.num_steps = 4
  run.train(tiny_config, straight)

  resumed = str(tmp_path / "resumed")
  tiny_config.training.num_steps = 2
  run.train(tiny_config, resumed)
  first, _ = _restore(tiny_config, resumed)
  assert int(first.step) == 2
  tiny_config.training.num_steps = 4
  run.train(tiny_config, resumed)

  a, _ = _restore(tiny_config, straight)
  b, _ = _restore(tiny_config, resumed)
  assert int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  steps = [r["step"] for r in _read_jsonl(os.path.join(resumed, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]


def test_eval_bpd_report(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  run.train(tiny_config, workdir)
  report = run.evaluate(tiny_config, workdir)
  saved = json.load(open(os.path.join(workdir, "eval", "bpd.json")))
  assert saved["bpd"] == pytest.approx(report["bpd"])
  for key in ("bpd", "bpd_stderr", "sde_bpd", "num_importance", "dequantization", "solver",
              "rtol", "atol", "divergence", "nfe_mean", "num_images", "checkpoint_step",
              "dataset", "dataset_version", "wall_time_s"):
    assert key in saved, key
  assert saved["num_images"] == 16 and saved["checkpoint_step"] == 3
  assert np.isfinite(saved["bpd"]) and saved["bpd"] > 0
