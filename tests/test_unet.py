"""The U-Net backbone: shapes, the zero-initialized output, per-example independence
(the block-diagonal Jacobian the ODE's per-image divergence relies on), dropout.

Compiling flax's initializers with the default threefry PRNG costs ~10 s on 2 CPU cores,
so the one real initialization (for the zero-output check) and the dropout masks use
``rbg`` keys, and the other tests use numpy random weights of the same shapes, which is
also what makes their outputs non-trivial.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode_jax.networks.unet import UNet

SMALL = dict(channels=8, num_blocks=1, embed_dim=16, num_groups=4, gamma_min=-13.3,
             gamma_max=5.0)


def _init_fn(net, shape):
  return lambda key: net.init({"params": key}, jnp.zeros(shape), jnp.zeros((shape[0],)),
                              train=False)["params"]


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _key(seed):
  return jax.random.key(seed, impl="rbg")


def _random_params(net, shape, seed=1, scale=0.3):
  """Random weights with the shapes of net's parameters (GroupNorm scales around 1)."""
  shapes = jax.eval_shape(_init_fn(net, shape), jax.random.PRNGKey(0))
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  values = []
  for path, leaf in leaves:
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    values.append(jnp.asarray(base + scale * rng.standard_normal(leaf.shape), leaf.dtype))
  return jax.tree.unflatten(tree, values)


@functools.cache
def _apply(net, train=False):
  if train:
    return jax.jit(lambda params, x, gamma, key: net.apply(
        {"params": params}, x, gamma, train=True, rngs={"dropout": key}))
  return jax.jit(lambda params, x, gamma: net.apply({"params": params}, x, gamma, train=False))


def test_zero_initialized_output_and_base_measure_skip():
  shape = (2, 5, 5, 2)
  x = _normal(2, shape)
  gamma = jnp.array([-10.0, 3.0])
  skip, plain = UNet(**SMALL, base_measure_skip=True), UNet(**SMALL, base_measure_skip=False)
  params = jax.jit(_init_fn(skip, shape))(_key(0))
  out = _apply(skip)(params, x, gamma)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(_apply(plain)(params, x, gamma), jnp.zeros_like(x))
  # with trained (here: random) weights the skip is exactly "+ x"
  params = _random_params(skip, shape)
  out, out_plain = _apply(skip)(params, x, gamma), _apply(plain)(params, x, gamma)
  assert float(jnp.abs(out_plain).max()) > 1e-2
  np.testing.assert_allclose(out - out_plain, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 3, 7, 1)])
def test_output_shape_for_odd_sizes_and_channels(shape):
  net = UNet(**SMALL)
  out = _apply(net)(_random_params(net, shape), _normal(3, shape),
                    jnp.zeros((shape[0],)))
  assert out.shape == shape
  assert bool(jnp.all(jnp.isfinite(out)))


def test_examples_are_independent():
  net = UNet(**SMALL, dropout=0.0)
  shape = (3, 4, 4, 2)
  params = _random_params(net, shape)
  apply = _apply(net)
  x = _normal(3, shape)
  gamma = jnp.array([-5.0, 0.0, 2.0])
  out = apply(params, x, gamma)
  # changing image 1 or its gamma leaves images 0 and 2 alone ...
  out_x = apply(params, x.at[1].add(1.0), gamma)
  out_g = apply(params, x, gamma.at[1].set(-12.0))
  for other in (out_x, out_g):
    np.testing.assert_allclose(other[0], out[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other[2], out[2], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(other[1] - out[1]).max()) > 1e-3  # ... and does change image 1
  # a scalar gamma is the same as that gamma for every example
  np.testing.assert_allclose(apply(params, x, jnp.float32(0.0)),
                             apply(params, x, jnp.zeros((3,))), rtol=1e-5, atol=1e-6)


def test_jacobian_is_block_diagonal():
  net = UNet(**SMALL, dropout=0.0)
  shape = (2, 3, 3, 1)
  params = _random_params(net, shape)
  gamma = jnp.array([-3.0, 1.0])
  f = lambda x: net.apply({"params": params}, x, gamma, train=False).reshape(-1)
  x = _normal(4, shape)
  jac = np.asarray(jax.jit(jax.jacfwd(f))(x)).reshape(18, 18)
  np.testing.assert_allclose(jac[:9, 9:], 0.0, atol=1e-6)
  np.testing.assert_allclose(jac[9:, :9], 0.0, atol=1e-6)
  assert np.abs(jac[:9, :9]).max() > 1e-2 and np.abs(jac[9:, 9:]).max() > 1e-2


def test_dropout_only_in_training():
  shape = (2, 4, 4, 1)
  net = UNet(**SMALL, dropout=0.5)
  params = _random_params(net, shape)
  x = _normal(6, shape)
  gamma = jnp.array([-2.0, 2.0])
  train = _apply(net, train=True)
  evaluate = _apply(net)
  eval_out = evaluate(params, x, gamma)
  a, b = train(params, x, gamma, _key(0)), train(params, x, gamma, _key(1))
  assert float(jnp.abs(a - b).max()) > 1e-3
  assert float(jnp.abs(a - eval_out).max()) > 1e-3
  np.testing.assert_array_equal(a, train(params, x, gamma, _key(0)))
  np.testing.assert_array_equal(eval_out, evaluate(params, x, gamma))


def test_official_layout_switches():
  """cond_input='scalar' (one scalar per example before the first dense layer; None is
  0), time_proj='zero_no_bias' (no bias, zero at init) and block_attention (one attention
  block after each of the 2N + 1 down and up blocks, besides the middle one)."""
  shape = (2, 4, 4, 2)
  net = UNet(**SMALL, cond_input="scalar", time_proj="zero_no_bias", block_attention=True,
             time_embedding="official")
  params = jax.jit(lambda key: net.init({"params": key}, jnp.zeros(shape), jnp.zeros((2,)),
                                        train=False, cond=jnp.zeros((2,)))["params"])(_key(0))
  assert params["Dense_0"]["kernel"].shape == (SMALL["channels"] + 1, SMALL["embed_dim"])
  proj = params["ResnetBlock_0"]["Dense_0"]
  assert set(proj) == {"kernel"} and not np.any(proj["kernel"])
  attention = [k for k in params if k.startswith("AttentionBlock_")]
  assert len(attention) == 2 * SMALL["num_blocks"] + 1 + 1
  params = _random_params(net, shape)
  x, gamma = _normal(7, shape), jnp.array([-4.0, 1.0])
  apply = jax.jit(lambda p, x, g, c: net.apply({"params": p}, x, g, train=False, cond=c))
  zero = apply(params, x, gamma, jnp.zeros((2,)))
  np.testing.assert_allclose(
      net.apply({"params": params}, x, gamma, train=False), zero, rtol=1e-5, atol=1e-6)
  flagged = apply(params, x, gamma, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(flagged[0], zero[0])
  assert float(jnp.abs(flagged[1] - zero[1]).max()) > 1e-4


def test_augmentation_one_hot_becomes_the_official_flag():
  from configs import digits
  from diffode_jax import augmentation
  from diffode_jax.config import finalize_config
  from diffode_jax.model import build

  config = digits.get_config()
  m = config.model
  m.channels, m.num_blocks, m.embed_dim, m.num_groups = 8, 1, 16, 4
  m.cond_input = "scalar"
  config.data.augment = True
  c = build(finalize_config(config))
  params = _random_params_of(c.init_params)
  x = _normal(8, (8, 8, 8, 1))
  cond = augmentation.one_hot(jnp.arange(8))
  f = jax.jit(lambda p, x, cond: c.net_fn(p, x, 0.0, None, False, cond=cond))
  untransformed = f(params, x, None)
  with_cond = f(params, x, cond)
  np.testing.assert_allclose(with_cond[0], untransformed[0], rtol=1e-6, atol=1e-6)
  # every symmetry but the identity is the same flag, 1
  all_flipped = f(params, x, augmentation.one_hot(jnp.full((8,), 4)))
  np.testing.assert_allclose(with_cond[1:], all_flipped[1:], rtol=1e-6, atol=1e-6)
  assert all(float(jnp.abs(with_cond[i] - untransformed[i]).max()) > 1e-5 for i in range(1, 8))


def _random_params_of(init_params, seed=1, scale=0.3):
  shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
          + scale * rng.standard_normal(s.shape), s.dtype), shapes)


def test_remat_changes_memory_not_parameters_or_values():
  """model.remat: the same parameter tree (checkpoints do not depend on it, also with an
  attention block after every ResNet block), the same outputs and, to roundoff, the same
  gradients with dropout on."""
  shape = (2, 4, 4, 1)
  plain = UNet(**SMALL, dropout=0.5, block_attention=True)
  remat = UNet(**SMALL, dropout=0.5, block_attention=True, remat=True)
  tree = jax.eval_shape(_init_fn(plain, shape), jax.random.PRNGKey(0))
  assert jax.eval_shape(_init_fn(remat, shape), jax.random.PRNGKey(0)) == tree
  params = _random_params(plain, shape)
  x, gamma = _normal(7, shape), jnp.array([-2.0, 2.0])

  def loss(net):
    return jax.jit(jax.value_and_grad(lambda p: (net.apply(
        {"params": p}, x, gamma, train=True, rngs={"dropout": _key(3)})**2).sum()))

  (value, grads), (value_r, grads_r) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-5)
