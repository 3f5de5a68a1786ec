"""One real training step on the bundled digits and on mock CIFAR-10; resume; eval report."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from diffode_jax import data as data_lib
from diffode_jax import run
from diffode_jax.checkpoint import Checkpointer, checkpoint_dir
from diffode_jax.config import finalize_config
from diffode_jax.errors import ConfigError
from diffode_jax.model import build
from diffode_jax.train_state import init_state
from diffode_jax.train_state import make_optimizer


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _restore(config, workdir):
  config = finalize_config(config)
  components = build(config)
  template = init_state(config, components, make_optimizer(config.training))
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
  # The optimizer moved the parameters, by at most what Adam allows: |update| <= lr per
  # coordinate and step (normalized first moment, bias-corrected) plus the weight decay;
  # the warm-up gives steps 2 and 3 the full learning rate, step 1 none.
  lr = tiny_config.training.learning_rate
  assert 0 < max(moved) <= 2 * lr * (1 + tiny_config.training.weight_decay) * 1.01, moved


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
  rows = _read_jsonl(os.path.join(workdir, "eval", "per_image.jsonl"))[1:]
  values = np.array([r["bpd"] for r in rows])
  assert [r["index"] for r in rows] == list(range(16))
  assert saved["bpd"] == pytest.approx(values.mean(), rel=1e-12)
  assert saved["bpd_stderr"] == pytest.approx(values.std(ddof=1) / 4.0, rel=1e-9)
  assert saved["schedule"] == "VP" and saved["parameterization"] == "velocity"


def test_eval_every_logs_test_bpd_of_the_ema_params_once_per_step_across_resume(
    tiny_config, tmp_path):
  """training.eval_every: rows {step, test_bpd, ...} at steps 2 and 4 that equal eval_bpd
  of the checkpoint of the same step on the same images (same keys, same batch), and a
  resumed run logs each evaluation step once."""
  t = tiny_config.training
  t.num_steps, t.checkpoint_every, t.eval_every, t.eval_images = 4, 2, 2, 8
  t.keep_checkpoints = 5
  workdir = str(tmp_path / "run")
  run.train(tiny_config, workdir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  evals = [r for r in _read_jsonl(metrics) if "test_bpd" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(r["test_images"] == 8 and r["test_dequantization"] == "tn" for r in evals)

  # The step-2 number is eval_bpd of checkpoint 2's EMA params on the first 8 test images.
  import diffode_jax as dj
  model = dj.load(workdir, step=2)
  images = data_lib.load_split(model.config.data, "test").images[:8]
  bpd, _ = model.bpd(images, dj.eval_key(model.config), batch_size=8)
  assert evals[0]["test_bpd"] == pytest.approx(float(np.mean(bpd)), rel=1e-6)
  assert evals[0]["test_bpd"] != pytest.approx(evals[1]["test_bpd"], rel=1e-6)

  # A run killed after logging step 4's evaluation but before its checkpoint committed:
  # resumed from step 2, it drops the step-4 rows and evaluates step 4 again, once.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  t.num_steps = 6
  run.train(tiny_config, workdir)
  rows = _read_jsonl(metrics)
  assert [r["step"] for r in rows if "test_bpd" in r] == [2, 4, 6]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
  redone = [r for r in rows if r.get("step") == 4 and "test_bpd" in r][0]
  assert redone["test_bpd"] == pytest.approx(evals[1]["test_bpd"], rel=1e-6)


def test_eval_every_needs_eval_images(tiny_config, tmp_path):
  tiny_config.training.eval_every = 2
  tiny_config.training.eval_images = 0
  with pytest.raises(ConfigError, match="eval_images"):
    run.train(tiny_config, str(tmp_path / "run"))
