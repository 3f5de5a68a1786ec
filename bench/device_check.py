"""Device check: training and likelihood throughput at the CIFAR-10 reference size.

    python bench/device_check.py            # the reference size, for a GPU / TPU
    python bench/device_check.py --tiny     # tiny sizes, runs on a CPU in a minute
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/device_check.py --tiny

Measures, on random uint8 images (no download):

* the train step at the configured batch on one device: compile time, images/s, its
  compiled memory (temporaries + arguments) with and without ``model.remat`` (the remat
  step is compiled, not run), and the peak device memory of the run;
* the ODE likelihood (tn dequantization, Rademacher Hutchinson, rtol = atol = 1e-5) on one
  batch with the on-device diffrax solver and with the scipy host loop: images/s, NFE,
  seconds per function evaluation, bits/dim;
* the same diffrax likelihood on all devices of the machine (the batch split over them,
  as ``--mode=eval_bpd`` does), same images and keys: images/s and bits/dim beside the
  one-device numbers (the eval batch must be a multiple of the device count).

The drift of a freshly initialized network is trivial (zero-initialized output layer), so
the parameters get a small random perturbation first. Prints a table and writes
bench/results/device_check_<platform>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10_velocity  # noqa: E402
from diffode_jax import parallel  # noqa: E402
from diffode_jax.likelihood import bits_per_dim, make_log_prob_fn  # noqa: E402
from diffode_jax.placement import place_batch  # noqa: E402
from diffode_jax.config import eval_settings, finalize_config  # noqa: E402
from diffode_jax.model import build, count_params  # noqa: E402
from diffode_jax.train_state import (create_train_state, make_optimizer,  # noqa: E402
                                     make_train_step)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_config(tiny: bool, batch: int | None):
  config = cifar10_velocity.get_config()
  if tiny:
    config.data.image_size = 8
    m = config.model
    m.channels, m.num_blocks, m.embed_dim, m.num_groups = 16, 1, 32, 8
    config.training.batch_size = 8
  if batch:
    config.training.batch_size = batch
  return finalize_config(config)


def peak_memory_gb():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def size_text(gib: float) -> str:
  return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def compiled_gib(compiled) -> float:
  """Temporaries + arguments of a compiled program, GiB."""
  m = compiled.memory_analysis()
  return (m.temp_size_in_bytes + m.argument_size_in_bytes) / 2**30


def time_train(config, components, images, steps: int):
  optimizer = make_optimizer(config.training)
  state = create_train_state(components.init_params(jax.random.PRNGKey(0)), optimizer)
  step = jax.jit(make_train_step(components.loss_fn, optimizer, 0.9999, components.dim),
                 donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, images, jax.random.PRNGKey(1)).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, images, jax.random.PRNGKey(1))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, images, jax.random.PRNGKey(2 + i))
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - start) / steps
  return state.params, {"compile_s": compile_s, "step_s": per_step,
                        "images_per_s": images.shape[0] / per_step,
                        "peak_memory_gb": peak_memory_gb(),
                        "compiled_memory_gib": compiled_gib(compiled),
                        "loss_bpd": float(metrics["loss"])}


def remat_memory(config, images):
  """Compiled memory (GiB) of the same train step with model.remat (compiled, not run)."""
  remat_config = config.copy_and_resolve_references()
  remat_config.model.remat = True
  components = build(remat_config)
  optimizer = make_optimizer(remat_config.training)
  state = jax.eval_shape(lambda: create_train_state(
      components.init_params(jax.random.PRNGKey(0)), optimizer))
  step = jax.jit(make_train_step(components.loss_fn, optimizer, 0.9999, components.dim),
                 donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, images, jax.random.PRNGKey(1)).compile()
  return {"compiled_memory_gib": compiled_gib(compiled),
          "compile_s": time.perf_counter() - start}


def time_sharded_likelihood(config, components, params, images, mesh):
  """The diffrax likelihood with the batch split over mesh (eval_bpd's path)."""
  settings = eval_settings(config, rtol=1e-5, atol=1e-5)
  log_prob = make_log_prob_fn(components.drift, components.schedule,
                              components.num_levels, settings, mesh)
  key = jax.random.PRNGKey(3)
  host = np.asarray(images)
  if log_prob.mesh is not None:
    params = parallel.replicate(parallel.local_copy(params),
                                parallel.replicated_sharding(mesh))
  batch, num_real = place_batch(host, 0, len(host), log_prob.mesh)
  compile_start = time.perf_counter()
  log_prob(params, batch, key, num_real)
  first = time.perf_counter() - compile_start
  start = time.perf_counter()
  bound = log_prob(params, batch, key, num_real)
  seconds = time.perf_counter() - start
  bpd = bits_per_dim(bound.log_prob, components.dim)
  return {"devices": mesh.size, "first_call_s": first, "seconds": seconds,
          "nfe": float(np.mean(bound.nfe)), "images_per_s": len(host) / seconds,
          "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
          "per_image_bpd": [float(b) for b in bpd], "success": bound.success}


def time_likelihood(config, components, params, images, solver: str):
  settings = eval_settings(config, solver=solver, rtol=1e-5, atol=1e-5)
  log_prob = make_log_prob_fn(components.drift, components.schedule,
                              components.num_levels, settings)
  key = jax.random.PRNGKey(3)
  compile_start = time.perf_counter()
  log_prob(params, images, key)  # compile (diffrax) / warm the jitted drift (scipy)
  first = time.perf_counter() - compile_start
  start = time.perf_counter()
  bound = log_prob(params, images, key)
  seconds = time.perf_counter() - start
  nfe = float(np.mean(bound.nfe))
  bpd = bits_per_dim(bound.log_prob, components.dim)
  return {"first_call_s": first, "seconds": seconds, "nfe": nfe,
          "s_per_eval": seconds / nfe, "images_per_s": images.shape[0] / seconds,
          "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
          "success": bound.success}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU")
  parser.add_argument("--batch", type=int, default=None, help="train batch (default 128)")
  parser.add_argument("--eval_batch", type=int, default=None,
                      help="images per likelihood solve (default: train batch)")
  parser.add_argument("--steps", type=int, default=None, help="timed train steps")
  parser.add_argument("--perturb", type=float, default=1e-3,
                      help="std of the random perturbation of the parameters")
  parser.add_argument("--skip_scipy", action="store_true", help="skip the host-loop solver")
  args = parser.parse_args()

  config = make_config(args.tiny, args.batch)
  components = build(config)
  shape = (config.training.batch_size, config.data.image_size, config.data.image_size,
           config.data.channels)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, config.data.num_levels, shape, dtype=np.uint8))
  steps = args.steps or (5 if args.tiny else 20)

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.device_count()} x {device.platform}), "
        f"jax {jax.__version__}", flush=True)
  params, train = time_train(config, components, images, steps)
  print(f"params: {count_params(params):,}; train step: compile {train['compile_s']:.1f} s, "
        f"{train['images_per_s']:.1f} images/s", flush=True)
  train["remat"] = remat_memory(config, images)
  print(f"train step memory (compiled): {size_text(train['compiled_memory_gib'])}, with remat "
        f"{size_text(train['remat']['compiled_memory_gib'])}", flush=True)
  noise = jax.random.PRNGKey(4)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(noise, len(leaves))
  params = jax.tree.unflatten(treedef, [p + args.perturb * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])

  eval_images = images[:args.eval_batch] if args.eval_batch else images
  results = {"device": device.device_kind, "platform": device.platform,
             "num_devices": jax.device_count(), "jax": jax.__version__,
             "tiny": args.tiny, "params": count_params(params),
             "train_batch": shape[0], "eval_batch": int(eval_images.shape[0]),
             "image_shape": list(shape[1:]), "train": train, "likelihood": {}}
  solvers = ["dopri5"] + ([] if args.skip_scipy else ["scipy_rk45"])
  for solver in solvers:
    res = time_likelihood(config, components, params, eval_images, solver)
    results["likelihood"][solver] = res
    print(f"likelihood {solver}: {res['images_per_s']:.2f} images/s, NFE {res['nfe']:.0f}, "
          f"{1e3 * res['s_per_eval']:.1f} ms/eval, {res['bpd']:.3f} bits/dim", flush=True)

  one = parallel.make_mesh(jax.local_devices()[:1])
  every = parallel.make_mesh(jax.local_devices())
  results["multi_device"] = {}
  for label, mesh in (("one", one), ("all", every)):
    res = time_sharded_likelihood(config, components, params, eval_images, mesh)
    results["multi_device"][label] = res
    print(f"likelihood on {res['devices']} device(s): {res['images_per_s']:.2f} images/s, "
          f"NFE {res['nfe']:.0f}, {res['bpd']:.4f} bits/dim", flush=True)
  a, b = results["multi_device"]["one"], results["multi_device"]["all"]
  results["multi_device"]["max_abs_image_bpd_diff"] = float(
      np.max(np.abs(np.subtract(a["per_image_bpd"], b["per_image_bpd"]))))

  peak = train["peak_memory_gb"]
  peak_text = "n/a" if peak is None else f"{peak:.1f} GiB"
  lines = [
      f"Device check on {jax.device_count()} x {device.device_kind} ({device.platform}), "
      f"jax {jax.__version__}, "
      f"{'tiny sizes' if args.tiny else 'CIFAR-10 reference network'} "
      f"({results['params']:,} params, images {shape[1]}x{shape[2]}x{shape[3]}).", "",
      "| measure | value |", "|---|---|",
      f"| train step, batch {shape[0]} | {train['images_per_s']:.1f} images/s "
      f"({1e3 * train['step_s']:.0f} ms/step) |",
      f"| train step compile | {train['compile_s']:.1f} s |",
      f"| train step memory, compiled (temporaries + arguments) | "
      f"{size_text(train['compiled_memory_gib'])}; with model.remat "
      f"{size_text(train['remat']['compiled_memory_gib'])} |",
      f"| peak device memory (run, without remat) | {peak_text} |",
  ]
  for solver, res in results["likelihood"].items():
    lines.append(f"| likelihood {solver}, batch {eval_images.shape[0]}, rtol=atol=1e-5 | "
                 f"{res['images_per_s']:.2f} images/s, NFE {res['nfe']:.0f}, "
                 f"{1e3 * res['s_per_eval']:.1f} ms/eval |")
  if len(results["likelihood"]) == 2:
    a, b = results["likelihood"]["dopri5"], results["likelihood"]["scipy_rk45"]
    lines.append(f"| host loop / on device, total time | {b['seconds'] / a['seconds']:.2f}x |")
  md = results["multi_device"]
  for label in ("one", "all"):
    r = md[label]
    lines.append(f"| likelihood dopri5 on {r['devices']} device(s), batch {eval_images.shape[0]} "
                 f"| {r['images_per_s']:.2f} images/s, NFE {r['nfe']:.0f}, "
                 f"{r['bpd']:.4f} +- {r['bpd_stderr']:.4f} bits/dim |")
  lines.append(f"| largest per-image bits/dim difference, all devices vs one | "
               f"{md['max_abs_image_bpd_diff']:.1e} |")
  table = "\n".join(lines)
  print("\n" + table)
  os.makedirs(RESULTS, exist_ok=True)
  name = f"device_check_{device.platform}{'_tiny' if args.tiny else ''}"
  with open(os.path.join(RESULTS, name + ".json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(RESULTS, name + ".md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
