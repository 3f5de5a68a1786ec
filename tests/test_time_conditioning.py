"""The U-Net sees the noise level (and the conditioning input) in every shipped config.

The time embedding enters each ResNet block as a per-channel constant right before a
GroupNorm; with one channel per group that GroupNorm subtracts it again and the network
is blind to gamma (``networks/unet.py``, ``time_norm_group_size``). Each config in
configs/ is checked at its own channels per group, at a CPU-sized depth and width, with
perturbed parameters (the zero-initialized output layers of a fresh network would hide
any dependence): the output must move with gamma by far more than float32 rounding of
the output's scale, and the time-embedding parameters must get a gradient.
"""

import copy
import glob
import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode_jax as dj
from diffode_jax import cli, run
from diffode_jax.config import finalize_config
from diffode_jax.errors import ConfigError
from diffode_jax.networks import check_sees_time, make_network
from diffode_jax.networks.unet import time_blind_reason, time_norm_group_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))
# A change that float32 rounding cannot make: 1000 ulps of the output's scale.
MARGIN = 1000 * float(np.finfo(np.float32).eps)


def _reduced(name):
  """The config's network at its own channels per group, with at most 2 groups, one block
  and an 8x8 image: the same GroupNorm grouping at CPU cost."""
  config = importlib.import_module(f"configs.{name}").get_config()
  m = config.model
  groups = math.gcd(m.num_groups, m.channels)
  per_group = m.channels // groups
  with config.unlocked():
    m.num_groups = min(groups, 2)
    m.channels = per_group * m.num_groups
    m.num_blocks, m.embed_dim, m.dropout = 1, 32, 0.0
    config.data.image_size = 8
    config.data.image_width = None
  return config, per_group


def _perturbed(params, key, scale=0.3):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, noisy)


def _rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def _time_param_paths(params):
  """The time-embedding MLP (top-level Dense layers) and each ResNet block's projection
  of it (its first Dense layer)."""
  out = [(name,) for name in params if name.startswith("Dense_")]
  out += [(name, "Dense_0") for name in params if name.startswith("ResnetBlock_")]
  return out


def _setup(name):
  config, per_group = _reduced(name)
  config = finalize_config(config)
  net = make_network(config)
  c = config.data.channels
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, c), minval=-1.0, maxval=1.0)
  if net.cond_input == "scalar":
    cond = jnp.ones((2,))
  else:  # the one-hot projection exists only for augmented data
    cond = jnp.full((2, 8), 0.125) if config.data.augment else None
  params = net.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)), cond=cond)["params"]
  params = _perturbed(params, jax.random.PRNGKey(2))
  lo, hi = config.model.gamma_min, config.model.gamma_max
  gammas = (lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo))
  return config, net, params, x, gammas, per_group


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_sees_the_noise_level(name):
  config, net, params, x, (g1, g2), per_group = _setup(name)
  assert per_group >= 2, f"configs/{name}.py has one channel per GroupNorm group"
  out1 = net.apply({"params": params}, x, jnp.full((2,), g1))
  out2 = net.apply({"params": params}, x, jnp.full((2,), g2))
  scale = _rms(out1 - x) if net.base_measure_skip else _rms(out1)
  assert _rms(out1 - out2) > 1e3 * MARGIN * scale, (name, _rms(out1 - out2), scale)

  cotangent = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  def loss(p):
    return jnp.sum(cotangent * net.apply({"params": p}, x, jnp.full((2,), g1)))
  grads = jax.grad(loss)(params)
  total = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads)))
  for path in _time_param_paths(params):
    node = grads
    for part in path:
      node = node[part]
    norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(node)))
    assert norm > MARGIN * total, (name, path, norm, total)


@pytest.mark.parametrize("name", [n for n in CONFIGS
                                  if importlib.import_module(f"configs.{n}").get_config()
                                  .data.augment])
def test_augmented_configs_see_the_conditioning_input(name):
  config, net, params, x, (g1, _), _ = _setup(name)
  gamma = jnp.full((2,), g1)
  if net.cond_input == "scalar":
    a, b = jnp.zeros((2,)), jnp.ones((2,))
  else:
    a, b = jnp.zeros((2, 8)), jnp.eye(8)[:2]
  out_a = net.apply({"params": params}, x, gamma, cond=a)
  out_b = net.apply({"params": params}, x, gamma, cond=b)
  assert _rms(out_a - out_b) > 1e3 * MARGIN * _rms(out_a - x)


def test_a_blind_layout_is_what_the_test_above_would_catch():
  """The same measurement on the layout the guard refuses (32 channels, 32 groups): the
  output moves by rounding only and the time parameters get no gradient."""
  from diffode_jax.networks.unet import UNet

  net = UNet(channels=4, num_blocks=1, embed_dim=16, num_groups=4, attention=False)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1), minval=-1.0, maxval=1.0)
  params = _perturbed(net.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)))["params"],
                      jax.random.PRNGKey(2))
  out1 = net.apply({"params": params}, x, jnp.full((2,), -5.0))
  out2 = net.apply({"params": params}, x, jnp.full((2,), 3.0))
  assert _rms(out1 - out2) < 10 * MARGIN * _rms(out1 - x)
  grads = jax.grad(lambda p: jnp.sum(net.apply({"params": p}, x, jnp.full((2,), -5.0))))(
      params)
  assert float(jnp.abs(grads["Dense_0"]["kernel"]).max()) < 1e-3 * float(
      jnp.abs(grads["Conv_0"]["kernel"]).max())


@pytest.mark.parametrize("channels, num_groups, blind", [
    (32, 32, True), (32, 8, False), (32, 16, False), (1, 1, True), (7, 7, True),
    (7, 1, False), (6, 4, False), (12, 12, True), (128, 32, False), (2, 2, True)])
def test_the_condition_follows_the_groupnorm_grouping(channels, num_groups, blind):
  """Blind exactly when GroupNorm(gcd(num_groups, channels)) has one channel per group;
  the suggested layout is never blind and keeps the channel count when it can."""
  reason = time_blind_reason(channels, num_groups)
  assert (reason is not None) == blind
  assert blind == (time_norm_group_size(channels, num_groups) == 1)
  if blind:
    assert f"model.channels={channels}" in reason and f"model.num_groups={num_groups}" in reason
    fix = reason.rsplit("; ", 1)[1]
    if channels >= 2:
      suggested = int(fix.split("model.num_groups=")[1].split()[0])
      assert time_blind_reason(channels, suggested) is None


def _blind(tiny_config):
  config = copy.deepcopy(tiny_config)
  config.model.num_groups = config.model.channels
  return config


def test_training_a_blind_network_from_scratch_is_one_line(tiny_config, tmp_path, capsys):
  workdir = tmp_path / "run"
  status = cli.dispatch(_blind(tiny_config), str(workdir), "train")
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert status == 1 and len(lines) == 1, lines
  assert lines[0].startswith("error: model.channels=8 with model.num_groups=8")
  assert "cannot see the noise level" in lines[0] and "model.num_groups=2" in lines[0]
  assert not workdir.exists() or not os.listdir(workdir)
  with pytest.raises(ConfigError):
    check_sees_time(finalize_config(_blind(tiny_config)).model, from_scratch=True)


def test_a_checkpoint_fixes_the_layout_so_it_only_warns(tiny_config, capsys):
  check_sees_time(finalize_config(_blind(tiny_config)).model, from_scratch=False)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: model.channels=8 with "
                                                 "model.num_groups=8"), lines
  assert "cannot see the noise level" in lines[0] and "used as it is" in lines[0]
  check_sees_time(finalize_config(tiny_config).model, from_scratch=False)
  assert capsys.readouterr().err == ""
