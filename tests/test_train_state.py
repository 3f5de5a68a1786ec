"""EMA warm-up and the optimizer's update bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from diffode_jax.train_state import (create_train_state, ema_decay_at, make_optimizer,
                                     make_train_step)


def _training(**kw):
  base = dict(learning_rate=0.1, warmup_steps=1, b1=0.9, b2=0.99, eps=1e-8,
              weight_decay=0.0, grad_clip=0.0, grad_accum_steps=1, ema_decay=0.999)
  base.update(kw)
  return ConfigDict(base)


def test_ema_decay_warmup_rule():
  assert float(ema_decay_at(0.999, 0, True)) == pytest.approx(0.1)
  assert float(ema_decay_at(0.999, 90, True)) == pytest.approx(91 / 100)
  assert float(ema_decay_at(0.999, 10**6, True)) == pytest.approx(0.999)
  assert float(ema_decay_at(0.999, 3, False)) == pytest.approx(0.999)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_recursion(warmup):
  """ema_n = d_n ema_{n-1} + (1 - d_n) params_n with d_n from ema_decay_at(n)."""
  params = {"w": jnp.array([1.0, -2.0])}
  loss_fn = lambda p, k, key, train: (jnp.sum((p["w"] - k) ** 2), None)

  def fake_terms(p, k, key, train):
    value, _ = loss_fn(p, k, key, train)
    zero = jnp.zeros((1,))
    terms = type("T", (), {"diffusion": zero, "second_order": zero,
                           "sde_nats": lambda self: zero})()
    return value, terms

  optimizer = make_optimizer(_training())
  state = create_train_state(params, optimizer)
  step = jax.jit(make_train_step(fake_terms, optimizer, 0.999, 2, ema_warmup=warmup))
  ema = np.asarray(params["w"])
  for n in range(1, 5):
    state, _ = step(state, jnp.array([0.5, 0.5]), jax.random.PRNGKey(n))
    d = float(ema_decay_at(0.999, n, warmup))
    ema = d * ema + (1 - d) * np.asarray(state.params["w"])
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-6)
  assert int(state.step) == 4
  assert int(optax.tree.norm(state.params["w"] - params["w"]) > 0)
