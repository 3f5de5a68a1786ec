"""The checkpoint store (checkpoint.py: orbax round trips, step selection, shape checks)
and the restores built on it (run/restore.py for training, trained.py for evaluation)."""

import os

import jax
import numpy as np
import pytest

from diffode_jax import checkpoint, paths
from diffode_jax.checkpoint import Checkpointer, resolve_source
from diffode_jax.run.restore import load_params, restore_or_init
from diffode_jax.trained import restore_ema_params, restore_for_eval
from diffode_jax.config import finalize_config
from diffode_jax.errors import CheckpointError
from diffode_jax.model import build
from diffode_jax.train_state import init_state, make_optimizer


def _state(scale):
  return {"params": {"w": np.full((3, 4), scale, np.float32), "b": np.arange(4.0, dtype=np.float32)},
          "step": np.asarray(int(scale), np.int32)}


def test_save_restore_round_trip_latest_and_given_step(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)))
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3  # keep=2 rotated step 1 out
  latest = ckpt.restore(_state(0.0))
  np.testing.assert_array_equal(latest["params"]["w"], np.full((3, 4), 3.0, np.float32))
  older = ckpt.restore(_state(0.0), step=2)
  assert int(older["step"]) == 2
  with pytest.raises(CheckpointError, match="no checkpoint for step 1"):
    ckpt.restore(_state(0.0), step=1)
  ckpt.close()


def test_restore_into_another_shape_is_a_checkpoint_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, _state(1.0))
  wrong = _state(0.0)
  wrong["params"]["w"] = np.zeros((4, 4), np.float32)
  with pytest.raises(CheckpointError, match=r"does not match the configured model.*\(3, 4\)"):
    ckpt.restore(wrong)
  ckpt.close()


def test_resolve_source_accepts_workdir_checkpoints_dir_or_one_step(tmp_path):
  w = str(tmp_path / "run")
  ck = paths.checkpoint_dir(w)
  assert resolve_source(w) == (ck, None)
  assert resolve_source(ck + "/") == (ck, None)
  assert resolve_source(os.path.join(ck, "40")) == (ck, 40)


def test_restore_or_init_new_then_resumed_then_init_from(tiny_config, tmp_path):
  """No checkpoint: the initial state; after a save: that state, resumed; a new workdir with
  training.init_from: the source's params and EMA params at step 0 with a fresh optimizer."""
  config = finalize_config(tiny_config)
  components = build(config)
  optimizer = make_optimizer(config.training)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  source = str(tmp_path / "source")
  state, resumed = restore_or_init(config, source, components, optimizer, sharding)
  assert not resumed and int(state.step) == 0
  fresh = init_state(config, components, optimizer)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  moved = state.replace(step=state.step + 7,
                        params=jax.tree.map(lambda p: p + 1.0, state.params),
                        ema_params=jax.tree.map(lambda p: p - 1.0, state.params))
  ckpt = Checkpointer(paths.checkpoint_dir(source))
  ckpt.save(7, moved)
  ckpt.close()
  again, resumed = restore_or_init(config, source, components, optimizer, sharding)
  assert resumed and int(again.step) == 7

  with config.unlocked():
    config.training.init_from = source
  started, resumed = restore_or_init(config, str(tmp_path / "fine"), components, optimizer,
                                     sharding)
  assert not resumed and int(started.step) == 0
  for got, want in ((started.params, moved.params), (started.ema_params, moved.ema_params)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  ema, step = restore_ema_params(config, source, components)
  assert step == 7
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(moved.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params, ema2, step = load_params(os.path.join(paths.checkpoint_dir(source), "7"),
                                   components.init_params(jax.random.PRNGKey(0)))
  assert step == 7


def test_restore_for_eval_without_checkpoints_says_train_first(tiny_config, tmp_path):
  with pytest.raises(CheckpointError, match="train first"):
    restore_for_eval(finalize_config(tiny_config), str(tmp_path / "nothing"))
  assert not (tmp_path / "nothing").exists()
  assert checkpoint.CheckpointError is CheckpointError


@pytest.mark.parametrize("delete_folder", [False, True])
def test_a_failed_save_says_what_is_left_on_disk(tmp_path, monkeypatch, delete_folder):
  """The error of a failed save names the checkpoints that exist now, not the ones listed
  before: a folder deleted during the run leaves none, and the message says so."""
  import shutil

  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=3, owner=True)
  ckpt.save(1, _state(1.0))
  ckpt.save(2, _state(2.0))

  def failing_save(*args, **kwargs):
    if delete_folder:
      shutil.rmtree(directory)
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt.manager, "save", failing_save)
  with pytest.raises(CheckpointError) as err:
    ckpt.save(3, _state(3.0))
  message = str(err.value)
  if delete_folder:
    assert "folder itself is gone" in message and "intact" not in message
  else:
    assert "earlier checkpoints on disk are steps [1, 2]" in message
  assert "No space left on device" in message
