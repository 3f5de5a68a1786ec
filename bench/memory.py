"""Memory of the train step, per device, from the compiled program (nothing is run).

    python bench/memory.py                 # the README table (reference CIFAR-10 and ImageNet-32 widths)
    python bench/memory.py --config=cifar10 --batch=64 --devices=4 --remat --second_order

Each row compiles the train step of ``--mode=train`` (the same ``make_train_step``, jit
with donated state, the batch split over a mesh of ``devices`` devices, params and
optimizer state replicated) for abstract inputs (``jax.ShapeDtypeStruct`` /
``jax.eval_shape``: no parameters are initialized, no step runs) and reads
``compiled.memory_analysis()`` and ``compiled.cost_analysis()`` of the per-device program:

* ``temp``: XLA's temporaries (activations kept for the backward pass, workspace);
* ``args``: the arguments (params, EMA params, AdamW state, the batch shard);
* ``flops``: XLA's operation count of one step on one device;
* ``residuals``: what JAX saves for the backward pass (``jax.ad_checkpoint.
  print_saved_residuals`` of the loss on one device's share of the batch), before XLA
  fuses anything.

On a CPU the devices are fake (``--xla_force_host_platform_device_count``, set here
before JAX starts) and the figures are XLA:CPU's: GPU and TPU compilers fuse, lay out and
schedule differently. In particular XLA:CPU drops ``jax.checkpoint``'s optimization
barriers early in its pipeline (``OptimizationBarrierExpander`` runs before fusion and
scheduling, while the GPU compiler runs it after scheduling), so on a CPU remat changes
the residuals but not the compiled temporaries; the residual column shows what remat
saves. Writes bench/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

# name -> model overrides of configs/cifar10_velocity.py (docs/reproducing.md, The official setup).
CONFIGS = {
    "cifar10": {},  # 128 channels, 32 blocks, embedding 512: 30.6M parameters
    "imagenet32": {"channels": 256, "embed_dim": 1024},  # the official imagenet32 width
}
# The README table: (config, global batch, devices, remat, second order).
TABLE = [
    ("cifar10", 128, 1, False, False),
    ("cifar10", 128, 8, False, False),
    ("cifar10", 128, 8, True, False),
    ("cifar10", 128, 8, False, True),
    ("cifar10", 128, 8, True, True),
    ("imagenet32", 128, 8, False, False),
    ("imagenet32", 128, 8, True, False),
]


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=sorted(CONFIGS), help="one row instead of the table")
  parser.add_argument("--batch", type=int, default=128, help="global batch")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--second_order", action="store_true")
  parser.add_argument("--out", default="memory", help="results file name (no extension)")
  return parser.parse_args()


def _bytes_of(line: str) -> int:
  """Bytes of one line of print_saved_residuals ("f32[16,32,32,128] output of ...")."""
  match = re.match(r"\s*([a-z]+)(\d*)\[([\d,]*)\]", line)
  if not match:
    return 0
  kind, bits, dims = match.groups()
  size = math.prod(int(d) for d in dims.split(",") if d)
  itemsize = 1 if kind == "bool" else (int(bits) // 8 if bits else 4)
  return size * itemsize


def residual_bytes(loss_fn, params, batch) -> int:
  """Bytes JAX saves for the backward pass of loss_fn (the arguments excluded)."""
  import jax
  from jax.ad_checkpoint import print_saved_residuals

  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    print_saved_residuals(
        lambda p, k, key: loss_fn(p, k, key, True)[0], params, batch,
        jax.random.PRNGKey(0))
  return sum(_bytes_of(line) for line in buffer.getvalue().splitlines()
             if "from the argument" not in line)


def measure(name: str, batch: int, devices: int, remat: bool, second_order: bool) -> dict:
  import jax
  import jax.numpy as jnp

  from configs import cifar10_velocity
  from diffode_jax import parallel, precision
  from diffode_jax.config import finalize_config
  from diffode_jax.model import build, count_params
  from diffode_jax.train_state import init_state, make_optimizer, make_train_step

  config = cifar10_velocity.get_config()
  for field, value in CONFIGS[name].items():
    config.model[field] = value
  config.model.remat, config.model.second_order = remat, second_order
  config.training.batch_size = batch
  config = finalize_config(config)
  components = build(config)
  optimizer = make_optimizer(config.training)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  replicated = parallel.replicated_sharding(mesh)
  place = lambda tree, sharding: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
  state = place(jax.eval_shape(lambda: init_state(config, components, optimizer)), replicated)
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  images = jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=parallel.batch_sharding(mesh))
  key = place(jax.eval_shape(lambda: jax.random.PRNGKey(0)), replicated)
  step = make_train_step(components.loss_fn, optimizer, config.training.ema_decay,
                         components.dim)
  start = time.perf_counter()
  compiled = jax.jit(precision.traced_with(config.training.precision, step),
                     donate_argnums=0, out_shardings=replicated).lower(
                         state, images, key).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  local = jax.ShapeDtypeStruct((batch // devices,) + shape[1:], jnp.uint8)
  residuals = residual_bytes(components.loss_fn, jax.eval_shape(
      components.init_params, jax.random.PRNGKey(0)), local)
  return {"config": name, "params": count_params(state.params), "global_batch": batch,
          "devices": devices, "per_device_batch": batch // devices, "remat": remat,
          "second_order": second_order, "compile_s": compile_s,
          "temp_bytes": int(memory.temp_size_in_bytes),
          "argument_bytes": int(memory.argument_size_in_bytes),
          "output_bytes": int(memory.output_size_in_bytes),
          "alias_bytes": int(memory.alias_size_in_bytes),
          "flops": float((cost or {}).get("flops", float("nan"))),
          "residual_bytes": int(residuals)}


def table(rows, header) -> str:
  gib = lambda b: f"{b / 2**30:.1f}"
  lines = [header, "",
           "| network | params | global batch | devices | per device | remat | 2nd order "
           "| temp GiB / device | args GiB / device | residuals GiB / device "
           "| TFLOP / device / step | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['global_batch']} | {r['devices']} "
        f"| {r['per_device_batch']} | {'yes' if r['remat'] else 'no'} "
        f"| {'yes' if r['second_order'] else 'no'} | {gib(r['temp_bytes'])} "
        f"| {gib(r['argument_bytes'])} | {gib(r['residual_bytes'])} "
        f"| {r['flops'] / 1e12:.2f} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main():
  args = parse_args()
  rows_wanted = ([(args.config, args.batch, args.devices, args.remat, args.second_order)]
                 if args.config else TABLE)
  devices = max(r[2] for r in rows_wanted)
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:  # before JAX starts
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
  sys.path.insert(0, ROOT)
  import jax

  if jax.device_count() < devices:
    sys.exit(f"error: {devices} devices wanted, {jax.device_count()} present")
  rows = []
  for row in rows_wanted:
    result = measure(*row)
    rows.append(result)
    print(json.dumps(result), flush=True)
  device = jax.devices()[0]
  header = (f"Train-step memory per device from the compiled program on {device.platform} "
            f"({device.device_kind}, {os.cpu_count()} CPUs), jax {jax.__version__}; "
            f"float32, training.precision default, AdamW + EMA state replicated.")
  text = table(rows, header)
  print(text)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{args.out}.json"), "w") as f:
    json.dump({"platform": device.platform, "device_kind": device.device_kind,
               "jax": jax.__version__, "python": platform.python_version(),
               "rows": rows}, f, indent=2)
  with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
