"""Fine-tune a small flow model by maximizing its ODE likelihood (docs/own_model.md).

    python examples/likelihood_finetune.py                  # CPU, about half an hour
    python examples/likelihood_finetune.py --pretrain_steps=200 --finetune_steps=10

A rectified-flow velocity network (the straight path, ``predicts="dx_dt"``) is trained on
the bundled digits with the flow-matching loss, then wrapped with ``dj.from_fn``. From the
same start, two fine-tunes run for the same number of steps:

- likelihood: Adam on the bits/dim of ``model.log_prob_fn()`` (the dequantized ODE bound,
  differentiated through the solve), on training batches;
- control: the same steps of the flow-matching loss, so that what the likelihood fine-tune
  gains is not just more training.

All three models are evaluated on the same test digits with the same key (same
dequantization noise and probe), and the script prints each test bits/dim and the paired
differences (per-image mean +- standard error).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import diffode_jax as dj  # noqa: E402
from configs import digits  # noqa: E402
from diffode_jax import data  # noqa: E402


class Net(nn.Module):
  """A small convolutional velocity network of (x, t)."""

  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    freqs = jnp.arange(1, 9, dtype=jnp.float32)
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    h = jnp.concatenate([x, jnp.broadcast_to(emb[:, None, None], x.shape[:3] + (16,))], -1)
    for _ in range(3):
      h = nn.swish(nn.Conv(self.width, (3, 3))(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def to_units(k: np.ndarray, num_levels: int) -> np.ndarray:
  """Integer levels to the model's units, [-1, 1] (bin centres)."""
  return (2.0 * k.astype(np.float32) + 1.0) / num_levels - 1.0


def adam_steps(loss: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any,
               images: np.ndarray, steps: int, batch: int, lr: float, seed: int,
               label: str) -> tuple[Any, list[float]]:
  """``steps`` Adam steps of loss(params, batch_of_images, key) on random batches of
  images; returns the params and the loss of every step."""
  opt = optax.apply_if_finite(optax.adam(lr), max_consecutive_errors=5)  # skip a failed solve
  state = opt.init(params)
  pool = jnp.asarray(images)

  @jax.jit
  def step(params, state, key):
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch,), 0, pool.shape[0])
    value, grads = jax.value_and_grad(loss)(params, pool[idx], k_loss)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, value

  losses = []
  start = time.perf_counter()
  for i in range(steps):
    params, state, value = step(params, state, jax.random.fold_in(jax.random.PRNGKey(seed), i))
    losses.append(float(value))
    if steps >= 10 and (i + 1) % max(1, steps // 10) == 0:
      print(f"  {label} step {i + 1}/{steps}: loss {np.mean(losses[-max(1, steps // 10):]):.4f}"
            f" ({time.perf_counter() - start:.0f} s)", flush=True)
  return params, losses


def run(pretrain_steps: int, finetune_steps: int, test_images: int, batch: int,
        finetune_lr: float, train_tol: float = 1e-3, train_max_steps: int = 256,
        width: int = 32, seed: int = 0) -> dict[str, Any]:
  """The experiment; returns the test bits/dim of each model (per image) and the losses."""
  config = digits.get_config().data
  V = config.num_levels
  train = data.load_split(config, "train").images
  test = data.load_split(config, "test").images[:test_images]
  shape = tuple(train.shape[1:])
  dim = math.prod(shape)
  path = dj.path("straight")
  net = Net(width)

  def velocity(params, x, t):
    return net.apply({"params": params}, x, t)

  def flow_loss(params, k, key):  # flow matching on the straight path, data at bin centres
    y = (2.0 * k.astype(jnp.float32) + 1.0) / V - 1.0
    k1, k2 = jax.random.split(key)
    t = jax.random.uniform(k1, (y.shape[0],))
    eps = jax.random.normal(k2, y.shape)
    tt = t[:, None, None, None]
    return jnp.mean((velocity(params, (1 - tt) * y + tt * eps, t) - (eps - y)) ** 2)

  def model_of(params):
    return dj.from_fn(velocity, params, predicts="dx_dt", **path, num_levels=V,
                      data_range=(-1, 1), image_shape=shape)

  init = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, *shape)), jnp.zeros((1,)))["params"]
  print(f"pretraining with flow matching: {pretrain_steps} steps", flush=True)
  pretrained, _ = adam_steps(flow_loss, init, train, pretrain_steps, 64, 1e-3, seed + 1,
                             "flow matching")
  base = model_of(pretrained)
  # The training bound: a looser solve than the evaluation's (its gradient is the exact
  # gradient of that discretized solve; a failed solve is a NaN step that Adam skips). The
  # backward pass recomputes steps through diffrax's checkpointing, whose depth grows with
  # max_steps, so a small max_steps keeps a step cheap. Evaluation uses the defaults.
  log_prob = base.log_prob_fn(rtol=train_tol, atol=train_tol, max_steps=train_max_steps)

  def bpd_loss(params, k, key):
    return -jnp.mean(log_prob(params, k, key)) / (dim * math.log(2.0))

  print(f"fine-tuning by likelihood: {finetune_steps} steps, lr {finetune_lr}", flush=True)
  tuned, bpd_losses = adam_steps(bpd_loss, pretrained, train, finetune_steps, batch,
                                 finetune_lr, seed + 2, "likelihood")
  print(f"control, flow matching: {finetune_steps} more steps", flush=True)
  control, _ = adam_steps(flow_loss, pretrained, train, finetune_steps, 64, 1e-3, seed + 2,
                          "control")
  key = jax.random.PRNGKey(seed + 3)  # one key: the same noise and probe for all three
  results: dict[str, Any] = {"finetune_losses": bpd_losses}
  for name, params in (("pretrained", pretrained), ("likelihood fine-tune", tuned),
                       ("control (flow matching)", control)):
    bpd, report = base.with_params(params).bpd(test, key, batch_size=64)
    results[name] = {"bpd": bpd, "nfe": report["nfe_mean"]}
    print(f"{name:24s} test bits/dim {bpd.mean():.4f} +- "
          f"{bpd.std(ddof=1) / math.sqrt(len(bpd)):.4f}  NFE {report['nfe_mean']:.0f}", flush=True)
  for name in ("likelihood fine-tune", "control (flow matching)"):
    diff = results[name]["bpd"] - results["pretrained"]["bpd"]
    print(f"{name} - pretrained: {diff.mean():+.4f} +- "
          f"{diff.std(ddof=1) / math.sqrt(len(diff)):.4f} bits/dim (paired, "
          f"{len(diff)} test digits)")
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrain_steps", type=int, default=2000)
  parser.add_argument("--finetune_steps", type=int, default=100)
  parser.add_argument("--test_images", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32, help="likelihood fine-tune batch")
  parser.add_argument("--lr", type=float, default=2e-4, help="likelihood fine-tune rate")
  parser.add_argument("--train_tol", type=float, default=1e-3,
                      help="rtol = atol of the fine-tune's solves (evaluation: the defaults)")
  parser.add_argument("--train_max_steps", type=int, default=256)
  args = parser.parse_args()
  run(args.pretrain_steps, args.finetune_steps, args.test_images, args.batch, args.lr,
      args.train_tol, args.train_max_steps)


if __name__ == "__main__":
  main()
