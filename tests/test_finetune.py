"""training.init_from: a new run (e.g. the second-order fine-tune) from another run's params."""

import copy

import jax
import numpy as np
import pytest

import procs
from diffode_jax import run
from diffode_jax.checkpoint import CheckpointError
from diffode_jax.run.restore import load_params
from diffode_jax.config import finalize_config
from diffode_jax.model import build
from diffode_jax.train_state import adam_state_of


def _params_template(config):
  components = build(finalize_config(config))
  return jax.eval_shape(components.init_params, jax.random.PRNGKey(0))


def test_init_from_starts_a_second_order_run_from_another_runs_params(tiny_config, tmp_path):
  source = tmp_path / "source"
  run.train(tiny_config, str(source))  # 3 steps, checkpoints at 2 and 3

  fine = copy.deepcopy(tiny_config)
  fine.model.second_order = True
  fine.training.init_from = str(source)
  fine.training.num_steps = 1
  row = run.train(fine, str(tmp_path / "fine"))
  # The trained objective is the first-order term plus the (non-zero) second-order term.
  assert row["second_order_bpd"] > 0
  assert row["loss"] == pytest.approx(row["diffusion_bpd"] + row["second_order_bpd"], rel=1e-5)

  src, got = procs.load_checkpoint(source), procs.load_checkpoint(tmp_path / "fine")
  assert int(got["step"]) == 1  # a new run: its own step count and optimizer
  # The warm-up makes the first update's learning rate 0, so the params are the source's
  # and the EMA took one step towards them from the source's EMA.
  procs.assert_trees_close(got["params"], src["params"], rtol=0, atol=0)
  d = fine.training.ema_decay
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, src["ema_params"], src["params"])
  procs.assert_trees_close(got["ema_params"], expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(src["ema_params"]["Conv_0"]["kernel"],
                         src["params"]["Conv_0"]["kernel"])  # EMA and raw params differ

  # A rerun of the fine-tune resumes its own checkpoint rather than starting again.
  fine.training.num_steps = 2
  run.train(fine, str(tmp_path / "fine"))
  assert [r["step"] for r in procs.read_metrics(tmp_path / "fine")] == [1, 2]

  # init_from also takes checkpoints/ or one step folder in it.
  template = _params_template(tiny_config)
  for path, step in [(source / "checkpoints", 3), (source / "checkpoints" / "2", 2)]:
    params, ema, got_step = load_params(str(path), template)
    assert got_step == step
    procs.assert_trees_close(ema, procs.load_checkpoint(source, step)["ema_params"], 0, 0)


def test_init_from_bad_source_is_a_checkpoint_error(tiny_config, tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoints in"):
    load_params(str(tmp_path / "nowhere"), _params_template(tiny_config))
  tiny_config.training.num_steps = 2
  run.train(tiny_config, str(tmp_path / "source"))
  wider = copy.deepcopy(tiny_config)
  wider.model.channels = 16
  with pytest.raises(CheckpointError, match="does not match the configured model"):
    load_params(str(tmp_path / "source"), _params_template(wider))



def test_init_from_optimizer_continues_adam_and_the_schedule(tiny_config, tmp_path):
  tiny_config.training.warmup_steps = 10  # the source ends inside the warm-up
  run.train(tiny_config, str(tmp_path / "source"))  # 3 steps, clipping on (digits)
  fine = copy.deepcopy(tiny_config)
  fine.training.init_from = str(tmp_path / "source")
  fine.training.grad_clip = 0.0  # another chain than the source's: the Adam state still maps
  fine.training.num_steps = 1
  run.train(fine, str(tmp_path / "fresh"))
  fine.training.init_from_optimizer = True
  row = run.train(fine, str(tmp_path / "carried"))

  state = lambda name: procs.load_checkpoint(tmp_path / name)
  adam = lambda s: adam_state_of(s["opt_state"])
  src, fresh, carried = state("source"), state("fresh"), state("carried")
  assert int(carried["step"]) == 1  # the run's own step count
  assert int(adam(carried)["count"]) == int(adam(src)["count"]) + 1 == 4
  assert int(adam(carried)["schedule_count"]) == 4
  assert row["learning_rate"] == pytest.approx(0.4 * tiny_config.training.learning_rate)
  # Same params, batch and key, so the same gradient g: fresh mu = (1 - b1) g, carried
  # mu = b1 mu_source + (1 - b1) g.
  b1 = fine.training.b1
  expected = jax.tree.map(lambda f, m: f + b1 * m, adam(fresh)["mu"], adam(src)["mu"])
  procs.assert_trees_close(adam(carried)["mu"], expected, rtol=1e-5, atol=1e-9)
  # A fresh optimizer's first update has learning rate 0; the carried one moves the params.
  procs.assert_trees_close(fresh["params"], src["params"], rtol=0, atol=0)
  assert not np.allclose(carried["params"]["Conv_0"]["kernel"], src["params"]["Conv_0"]["kernel"])
