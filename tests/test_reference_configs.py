"""The four published settings (configs/*_velocity.py): the official network, its
parameter count, and the official training choices.

``official_count`` is the closed-form parameter count of the official ScoreUNet
(model_vdm.py of thu-ml/i-DODE): with C channels, embedding width E, N blocks, c image
channels and F Fourier frequencies, a ResNet block of c_in inputs has
2 c_in (GroupNorm) + 9 c_in C + C (conv1) + E C (cond_proj, no bias) + 2 C + 9 C^2 + C
(conv2) [+ c_in C + C (nin_shortcut) when c_in != C]; an attention block 2 C + 4 (C^2 + C);
dense0 (C + 1) E + E (the time embedding plus the conditioning scalar), dense1 E^2 + E,
conv_in 9 c (1 + 2F) C + C, the output GroupNorm 2 C and conv_out 9 C c + c. There are
N + 2 blocks of C inputs (down and middle), N + 1 of 2 C (up), one middle attention and,
with block attention, 2 N + 1 more.
"""

import importlib

import jax
import numpy as np
import pytest

from diffode_jax import official
from diffode_jax.config import finalize_config
from diffode_jax.model import build, count_params
from diffode_jax.train_state import make_optimizer
from official_names import layout_of_config, to_official

CONFIGS = ("cifar10_velocity", "cifar10_aug_velocity", "imagenet32_old_velocity",
           "imagenet32_new_velocity")


def official_count(C, E, N, c, F, mid=True, block_attention=False, time_bias=False,
                   cond_inputs=1):
  def resnet(c_in):
    n = 2 * c_in + 9 * c_in * C + C + E * C + 2 * C + 9 * C * C + C
    n += C if time_bias else 0
    n += c_in * C + C if c_in != C else 0
    return n

  attention = 2 * C + 4 * (C * C + C)
  return ((C + cond_inputs) * E + E + E * E + E + 9 * c * (1 + 2 * F) * C + C
          + (N + 2) * resnet(C) + (N + 1) * resnet(2 * C)
          + (int(mid) + int(block_attention) * (2 * N + 1)) * attention
          + 2 * C + 9 * C * c + c)


def _config(name, **model):
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in model.items():
    config.model[key] = value
  return finalize_config(config)


def _shapes(config):
  return jax.eval_shape(build(config).init_params, jax.random.PRNGKey(0))


def _count_for(config, **kw):
  m = config.model
  return official_count(m.channels, m.embed_dim, m.num_blocks, config.data.channels,
                        m.fourier_max - m.fourier_min + 1, mid=m.attention,
                        block_attention=m.block_attention, **kw)


def test_formula_counts_the_official_fixture():
  """The formula against a checkpoint the official code wrote (C 32, E 128, N 2)."""
  import flax

  from test_official import FIXTURE_CKPT

  with open(f"{FIXTURE_CKPT}/ckpt-1.flax", "rb") as f:
    raw = flax.serialization.msgpack_restore(f.read())
  assert count_params(raw["params"]) == official_count(32, 128, 2, 3, 2) == 223_555


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_widths_follow_the_official_shapes(name):
  config = _config(name, channels=32, embed_dim=128, num_blocks=2)
  shapes = _shapes(config)
  assert count_params(shapes) == _count_for(config)
  C, E, c = 32, 128, config.data.channels
  o = to_official(shapes, layout_of_config(config))
  def shape(module, leaf="kernel"):
    node = o
    for name in module.split("/"):
      node = node[name]
    return tuple(node[leaf].shape)

  assert shape("conv_in") == (3, 3, c * 5, C) and shape("conv_out") == (3, 3, C, c)
  assert shape("dense0") == (C + 1, E) and shape("dense1") == (E, E)
  for block in ("down.block_0", "mid.block_1", "mid.block_2", "up.block_2"):
    assert set(o[block]["cond_proj"]) == {"kernel"} and shape(block + "/cond_proj") == (E, C)
  assert shape("up.block_0/nin_shortcut") == (2 * C, C) and "nin_shortcut" not in o["down.block_1"]
  assert "mid.attn_1" in o
  has_block_attention = name == "cifar10_aug_velocity"
  for attn in ("down.attn_0", "down.attn_1", "up.attn_0", "up.attn_2"):
    assert (attn in o) == has_block_attention
  if has_block_attention:
    assert shape("up.attn_2/q") == (C, C)


@pytest.mark.parametrize("name, expected", [
    ("cifar10_velocity", 30_578_179),
    ("cifar10_aug_velocity", 139_276_803),
    ("imagenet32_old_velocity", 122_137_603),
    ("imagenet32_new_velocity", 122_137_603),
])
def test_full_size_parameter_counts(name, expected):
  """jax.eval_shape of the full-width init (no real initialization) and the formula."""
  config = _config(name)
  assert count_params(_shapes(config)) == _count_for(config) == expected


def test_cifar10_network_in_the_native_layout():
  """30,586,243 (docs/reproducing.md, The official setup) is the CIFAR-10 network in this project's
  own layout: a bias on
  each of the 67 ResNet time projections (+67 x 128) and no conditioning row in dense0
  (-512). The official layout has 30,578,179."""
  config = _config("cifar10_velocity", cond_input="onehot", time_proj="with_bias",
                   time_embedding="native")
  count = count_params(_shapes(config))
  assert count == _count_for(config, time_bias=True, cond_inputs=0) == 30_586_243
  assert count - 67 * 128 + 512 == 30_578_179


@pytest.mark.parametrize("name, dataset, batch, steps, channels, dropout, k", [
    ("cifar10_velocity", "cifar10", 128, 6_000_000, 128, 0.1, 1),
    ("cifar10_aug_velocity", "cifar10", 1024, 10_000_000, 256, 0.05, 20),
    ("imagenet32_old_velocity", "imagenet32_old", 512, 2_000_000, 256, 0.1, 1),
    ("imagenet32_new_velocity", "imagenet32_new", 128, 2_000_000, 256, 0.1, 1),
])
def test_official_training_setup(name, dataset, batch, steps, channels, dropout, k):
  config = _config(name)
  m, t = config.model, config.training
  assert (config.data.dataset, t.batch_size, t.num_steps) == (dataset, batch, steps)
  assert (m.channels, m.embed_dim, m.num_blocks, m.dropout) == (channels, 4 * channels, 32,
                                                                dropout)
  assert config.eval.num_importance == k
  assert config.data.augment == (name == "cifar10_aug_velocity")
  assert (m.schedule, m.parameterization, m.gamma_min, m.gamma_max) == ("VP", "velocity",
                                                                        -13.3, 5.0)
  assert m.fourier_features and (m.fourier_min, m.fourier_max) == (6, 7)
  assert (t.b1, t.b2, t.eps, t.weight_decay, t.learning_rate, t.warmup_steps) == (
      0.9, 0.99, 1e-8, 0.01, 2e-4, 100)
  assert t.ema_decay == 0.9999 and not t.ema_warmup
  assert t.grad_clip == 0 and t.importance_sampling and t.antithetic_time
  assert t.weight_decay_mask == "all_but_biases"
  # With zero gradients Adam's step is 0, so only the decoupled weight decay moves a
  # parameter: after the warm-up's zero-rate first update, every parameter but the biases
  # shrinks, GroupNorm scales included (the official mask).
  params = {"GroupNorm_0": {"scale": np.ones(2), "bias": np.ones(2)},
            "Conv_0": {"kernel": np.ones((1, 1, 2, 2)), "bias": np.ones(2)}}
  optimizer = make_optimizer(t.copy_and_resolve_references())
  state, zeros = optimizer.init(params), jax.tree.map(np.zeros_like, params)
  for _ in range(2):
    updates, state = optimizer.update(zeros, state, params)
  decayed = jax.tree.map(lambda u: bool(np.all(np.asarray(u) < 0)), updates)
  assert decayed == {"GroupNorm_0": {"scale": True, "bias": False},
                     "Conv_0": {"kernel": True, "bias": False}}
