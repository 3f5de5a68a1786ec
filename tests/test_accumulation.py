"""Gradient accumulation: 4 micro-batches of 8 make the update of one batch of 32; the
augmented step hands the symmetry to the loss as cond."""

import jax
import jax.numpy as jnp
import numpy as np

from diffode_jax import augmentation
from diffode_jax.losses import LossTerms
from diffode_jax.train_state import create_train_state, make_optimizer, make_train_step


def _quadratic_loss(params, k, key, train=True, cond=None):
  """A deterministic loss (no noise draws), so micro-batches can be compared exactly."""
  del key, train, cond
  x = k.reshape(k.shape[0], -1).astype(jnp.float32) / 16.0
  pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
  per_example = jnp.sum((pred - 1.0) ** 2, axis=-1)
  zeros = jnp.zeros_like(per_example)
  return per_example.mean(), LossTerms(per_example, zeros, zeros, zeros)


def _training_config(accum):
  from configs import digits

  t = digits.get_config().training
  t.grad_accum_steps = accum
  t.warmup_steps = 2
  t.learning_rate = 0.05
  return t


def test_four_micro_batches_of_8_equal_one_batch_of_32():
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 17, (32, 4, 4, 1), dtype=np.uint8) for _ in range(2)]
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
                      "bias": jnp.zeros((3,), jnp.float32)}}
  key = jax.random.PRNGKey(0)

  states = {}
  for accum in (1, 4):
    t = _training_config(accum)
    optimizer = make_optimizer(t)
    step = jax.jit(make_train_step(_quadratic_loss, optimizer, 0.9, dim=16))
    state = create_train_state(params, optimizer)
    for batch in batches:
      for micro in np.split(batch, accum):
        state, metrics = step(state, jnp.asarray(micro), key)
    states[accum] = state
    assert float(metrics["grad_norm"]) > t.grad_clip  # clipping is active

  one, four = states[1], states[4]
  assert int(one.step) == 2 and int(four.step) == 8  # micro-batches consumed
  for a, b in zip(jax.tree.leaves((one.params, one.ema_params)),
                  jax.tree.leaves((four.params, four.ema_params))):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  assert not np.allclose(one.params["dense"]["kernel"], params["dense"]["kernel"])


def test_augmented_step_passes_the_symmetry_to_the_loss():
  seen = {}

  def loss_fn(params, k, key, train=True, cond=None):
    seen["k"], seen["cond"] = k, cond
    return _quadratic_loss(params, k, key, train)

  params = {"dense": {"kernel": jnp.ones((16, 3)), "bias": jnp.zeros((3,))}}
  optimizer = make_optimizer(_training_config(1))
  step = make_train_step(loss_fn, optimizer, 0.9, dim=16, augment=True)
  batch = jnp.asarray(np.random.default_rng(1).integers(0, 17, (8, 4, 4, 1), dtype=np.uint8))
  key = jax.random.PRNGKey(3)
  step(create_train_state(params, optimizer), batch, key)
  expected, cond = augmentation.augment(jax.random.fold_in(key, 1), batch)
  np.testing.assert_array_equal(seen["k"], expected)
  np.testing.assert_array_equal(seen["cond"], cond)
