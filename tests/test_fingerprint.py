"""A resumed evaluation reuses rows only for the same model and the same images."""

import copy
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import procs
from diffode_jax import run
from diffode_jax.fingerprint import images_fingerprint, params_fingerprint


def test_params_fingerprint_sees_every_leaf_and_the_structure():
  params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": jnp.ones(3)}
  base = params_fingerprint(params)
  assert params_fingerprint(copy.deepcopy(params)) == base
  bumped = jax.tree_util.tree_map(lambda x: x, params)
  bumped["b"] = params["b"].at[1].add(1e-7)  # one float32 ulp-scale change
  assert params_fingerprint(bumped) != base
  assert params_fingerprint({"a": params["a"], "c": params["b"]}) != base  # renamed
  assert params_fingerprint({**params, "b": params["b"].astype(jnp.float16)}) != base
  assert params_fingerprint({**params, "b": params["b"].reshape(3, 1)}) != base


def test_images_fingerprint_is_by_value():
  images = np.random.default_rng(0).integers(0, 17, (5, 8, 8, 1))
  base = images_fingerprint(images)
  assert images_fingerprint(images.astype(np.uint8)) == base  # dtype does not matter
  assert images_fingerprint(images, chunk=2) == base
  changed = images.copy()
  changed[3, 4, 4, 0] += 1
  assert images_fingerprint(changed) != base
  assert images_fingerprint(images[:4]) != base
  assert images_fingerprint(images[::-1]) != base


def test_a_retrained_model_at_the_same_step_is_evaluated_afresh(tiny_config, tmp_path,
                                                                monkeypatch):
  """Deleting checkpoints/ and metrics.jsonl and retraining to the same step with another
  learning rate leaves eval/per_image.jsonl of the deleted model behind: its header names
  the same step, seed and schedule, but not the same parameters."""
  workdir = str(tmp_path / "run")
  run.train(tiny_config, workdir)
  first = run.evaluate(tiny_config, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  other = copy.deepcopy(tiny_config)
  other.training.learning_rate = 10 * tiny_config.training.learning_rate
  run.train(other, workdir)
  computed = procs.count_evaluated_batches(monkeypatch)
  second = run.evaluate(other, workdir)
  assert computed, "the deleted model's rows were reused"
  assert second["checkpoint_step"] == first["checkpoint_step"]
  assert second["params_fingerprint"] != first["params_fingerprint"]
  assert second["bpd"] != pytest.approx(first["bpd"], rel=1e-6)
  assert second["images_fingerprint"] == first["images_fingerprint"]
  computed.clear()
  assert run.evaluate(other, workdir)["bpd"] == second["bpd"]  # same model: all reused
  assert computed == []
