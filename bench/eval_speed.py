"""Likelihood evaluation speed: the on-device diffrax solve against the scipy host loop.

    python bench/eval_speed.py            # digits U-Nets of 0.22M and 1.3M params (14 min on 2 busy cores)
    python bench/eval_speed.py --quick    # 36k and 0.22M params (3 min)

For each model size, on the same briefly trained digits model, the same test images,
the same dequantization noise and Rademacher probe, and the same tolerances:

* ``isolated call``: one jitted drift + divergence evaluation (the cost an ODE solver
  cannot go below), forward mode (jvp, the library's estimator) and reverse mode (vjp),
  averaged over a burst of calls half as long as a solve;
* ``diffrax tsit5, jvp``: the library's evaluator, ``likelihood.make_log_prob_fn``, with
  Tsit5 5(4);
* ``diffrax dopri5, jvp``: the same with Dormand-Prince 5(4), scipy's RK45 method, on
  device (the default ``eval.solver``, chosen by this benchmark: fewer evaluations);
* ``scipy RK45, jvp``: the official code's host loop (``eval.solver = scipy_rk45``);
* ``diffrax tsit5, vjp``: the Tsit5 solve with a VJP-based Hutchinson estimate, the
  variant that XLA:CPU runs slowly inside loops (jax-ml/jax#12868, docs/design.md, Numerical
  facts); it is so slow
  that only its first ``--vjp-steps`` solver steps are timed (the cost per evaluation is
  what is compared).

Every path is compiled first; then the paths take turns, ``--repeats`` rounds, so that a
change of machine load hits them alike, and each figure is the median over the rounds.
``s/eval`` is a solve's wall time over its number of function evaluations (NFE);
``in-solve / isolated`` shows hidden loop overhead (1.0: none; below 1: the isolated call
pays a dispatch from Python that the solve does not). bits/dim of each path come with
their standard errors over the images. Writes bench/results/eval_speed.{json,md}
(``eval_speed_quick`` with --quick).

The drift of a freshly initialized network is trivial (zero-initialized output layer),
hence the brief training (plain params, not the EMA, which would barely move).

Two further parts, separate from the table above (which they do not change):

    python bench/eval_speed.py --study    # solver tolerance study, ~15 min on 2 CPU cores
    python bench/eval_speed.py --exact    # memory and time of the chunked exact trace, ~5 min

``--study``: bits/dim and NFE of the same test images with the same keys at rtol = atol
in {1e-3, 1e-4, 1e-5, 1e-6}, for a digits model (``--digits_workdir``, default
runs/digits_demo of ``make demo`` if it has a checkpoint, else configs/digits.py trained
here for ``--study_steps`` steps) and an 8-bit photo_patches model (configs/photo_patches.py,
trained here likewise), EMA params, eval_bpd's settings otherwise. Per tolerance: the
mean bits/dim, its difference from the 1e-6 mean, the largest per-image difference from
1e-6, NFE and seconds. It also solves the same digits batch as 4 and 8 independent
shards (what per-device step-size control, e.g. shard_map, would do) to compare their
NFE with the one global solve. Writes bench/results/tolerance_study.{json,md}; the
workdirs it trains are kept under runs/bench_tolerance/ (a rerun reuses them).

``--exact``: ``eval.exact_trace_chunk`` on the photo tiles (D = 192): the compiled
temporaries of one drift + exact-divergence evaluation at batch 128 and its time at
batch 16, for the one-vmap trace and chunks of 64, 16 and 4, and the largest relative
difference of the chunked traces from the one-vmap one. Writes
bench/results/exact_trace.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402

from configs import digits  # noqa: E402
from diffode_jax import data, ode  # noqa: E402
from diffode_jax.dequantization import dequantize  # noqa: E402
from diffode_jax.likelihood import bits_per_dim, make_log_prob_fn  # noqa: E402
from diffode_jax.config import eval_settings, finalize_config  # noqa: E402
from diffode_jax.model import build, count_params  # noqa: E402
from diffode_jax.train_state import create_train_state, make_optimizer, make_train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name -> (channels, num_blocks, embed_dim)
SIZES = {"small": (32, 2, 128), "medium": (64, 4, 256)}
QUICK_SIZES = {"tiny": (16, 1, 32), "small": (32, 2, 128)}


def make_config(channels, num_blocks, embed_dim):
  config = digits.get_config()
  m = config.model
  m.channels, m.num_blocks, m.embed_dim = channels, num_blocks, embed_dim
  m.dropout = 0.0
  config.training.batch_size = 32
  config.training.warmup_steps = 10
  return finalize_config(config)


def train_briefly(config, components, steps: int):
  """Plain params after a few AdamW steps on digits (enough for a non-trivial drift)."""
  optimizer = make_optimizer(config.training)
  state = create_train_state(components.init_params(jax.random.PRNGKey(0)), optimizer)
  step = jax.jit(make_train_step(components.loss_fn, optimizer, 0.999, components.dim))
  train = data.load_split(config.data, "train")
  for i in range(steps):
    batch = data.host_batch(train, config.training.batch_size, i, 0)
    state, metrics = step(state, jnp.asarray(batch), jax.random.PRNGKey(i))
  return state.params, float(metrics["loss"])


def vjp_divergence(drift_fn, x, gamma, probe):
  """Hutchinson v^T J v with J^T v from a vector-Jacobian product (reverse mode)."""
  dx, pullback = jax.vjp(lambda y: drift_fn(y, gamma), x)
  (jtv,) = pullback(probe)
  return dx, (probe * jtv).reshape(x.shape[0], -1).sum(-1)


def median_time(fn, repeats: int):
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def mean_stderr(values):
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def bench_size(name, sizes, args):
  config = make_config(*sizes)
  components = build(config)
  start = time.perf_counter()
  params, loss = train_briefly(config, components, args.train_steps)
  train_s = time.perf_counter() - start
  images = jnp.asarray(data.load_split(config.data, "test").images[:args.batch])
  key = jax.random.PRNGKey(1)
  drift = components.drift
  schedule = components.schedule
  settings = eval_settings(config, solver="tsit5", rtol=args.tol, atol=args.tol)
  row = {"model": name, "params": count_params(params), "batch": args.batch,
         "train_steps": args.train_steps, "train_loss_bpd": loss, "train_s": train_s}

  # Isolated calls at a mid-range state.
  x = schedule.marginal(jnp.asarray(images, jnp.float32) / 8.0 - 1.0,
                        jax.random.normal(key, images.shape), 0.0)
  probe = ode.draw_probe("rademacher", key, images.shape)
  gamma = jnp.asarray(0.0, jnp.float32)
  isolated = {}
  for mode, fn in (("jvp", ode.drift_and_divergence), ("vjp", vjp_divergence)):
    call = jax.jit(lambda p, x, g, v, fn=fn: fn(lambda y, t: drift(p, y, t), x, g, v))
    jax.block_until_ready(call(params, x, gamma, probe))
    isolated[mode] = lambda call=call: call(params, x, gamma, probe)

  # The library's evaluator on device (jvp) and on the host (scipy RK45).
  device = make_log_prob_fn(drift, schedule, components.num_levels, settings)
  device_dopri = make_log_prob_fn(drift, schedule, components.num_levels,
                                  eval_settings(config, solver="dopri5", rtol=args.tol,
                                                atol=args.tol))
  host = make_log_prob_fn(drift, schedule, components.num_levels,
                          eval_settings(config, solver="scipy_rk45", rtol=args.tol,
                                        atol=args.tol))
  paths = {"diffrax_jvp": lambda: device(params, images, key),
           "diffrax_dopri5": lambda: device_dopri(params, images, key),
           "scipy_rk45": lambda: host(params, images, key)}
  for run in paths.values():
    run()  # compile
  # The isolated call is timed over bursts as long as half a solve, so that it averages
  # over the same load fluctuations as the solves (short bursts catch the quiet moments).
  burst = max(10, int(paths["diffrax_jvp"]().nfe[0]) // 2)

  # The same diffrax solve with a vjp estimator (the same noise and probe as
  # make_log_prob_fn draws). It is slow enough that only its first vjp_steps steps are
  # timed (max_steps caps the solve; the cost per evaluation is what is compared).
  capped = ode.SolverConfig(solver="tsit5", rtol=args.tol, atol=args.tol,
                            max_steps=args.vjp_steps)

  @jax.jit
  def solve_vjp(params, k, key):
    k_deq, k_probe = jax.random.split(jax.random.fold_in(key, 0))
    deq = dequantize("tn", k_deq, k, schedule, components.num_levels, settings.gamma_u)
    v = ode.draw_probe("rademacher", k_probe, k.shape)
    field = lambda g, state, a: vjp_divergence(lambda y, t: drift(params, y, t), state[0],
                                               g, v)
    y0 = (deq.z0, jnp.zeros(k.shape[0], jnp.float32))
    _, nfe, _ = ode.solve_diffrax(field, y0, deq.gamma0, schedule.gamma_max, capped)
    return nfe

  jax.block_until_ready(solve_vjp(params, images, key))  # compile
  paths["diffrax_vjp"] = lambda: solve_vjp(params, images, key)

  # Interleaved repeats, so that a change of machine load hits every path alike.
  times = {k: [] for k in ["isolated_jvp", "isolated_vjp"] + list(paths)}
  results = {}
  for _ in range(args.repeats):
    for mode, call in isolated.items():
      start = time.perf_counter()
      for _ in range(burst):
        jax.block_until_ready(call())
      times[f"isolated_{mode}"].append((time.perf_counter() - start) / burst)
    for path, run in paths.items():
      t, results[path] = median_time(run, 1)
      times[path].append(t)
  med = {k: statistics.median(v) for k, v in times.items()}
  row["isolated_jvp_s"], row["isolated_vjp_s"] = med["isolated_jvp"], med["isolated_vjp"]
  for path in ("diffrax_jvp", "diffrax_dopri5", "scipy_rk45"):
    bound = results[path]
    row[path] = {"total_s": med[path], "nfe": int(bound.nfe[0]),
                 "s_per_eval": med[path] / bound.nfe[0],
                 "bpd": mean_stderr(bits_per_dim(bound.log_prob, components.dim))}
  nfe = int(results["diffrax_vjp"])
  row["diffrax_vjp"] = {"total_s": med["diffrax_vjp"], "nfe": nfe,
                        "s_per_eval": med["diffrax_vjp"] / nfe, "capped_steps": args.vjp_steps}

  row["in_solve_over_isolated"] = row["diffrax_jvp"]["s_per_eval"] / row["isolated_jvp_s"]
  row["vjp_in_solve_over_isolated"] = (row["diffrax_vjp"]["s_per_eval"]
                                       / row["isolated_vjp_s"])
  row["host_over_device_total"] = row["scipy_rk45"]["total_s"] / row["diffrax_jvp"]["total_s"]
  row["host_over_device_per_eval"] = (row["scipy_rk45"]["s_per_eval"]
                                      / row["diffrax_jvp"]["s_per_eval"])
  row["host_over_dopri5_total"] = (row["scipy_rk45"]["total_s"]
                                   / row["diffrax_dopri5"]["total_s"])
  a, b = row["diffrax_jvp"]["bpd"], row["scipy_rk45"]["bpd"]
  row["bpd_diff_in_stderr"] = abs(a[0] - b[0]) / max(math.hypot(a[1], b[1]), 1e-12)
  return row


def table(rows, header):
  lines = [header, "",
           "| model | params | path | NFE | s/eval | isolated call | in-solve / isolated "
           "| total s | bits/dim |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for label, key, iso in (("diffrax tsit5, jvp", "diffrax_jvp", "isolated_jvp_s"),
                            ("diffrax dopri5, jvp", "diffrax_dopri5", "isolated_jvp_s"),
                            ("scipy RK45, jvp", "scipy_rk45", "isolated_jvp_s"),
                            ("diffrax tsit5, vjp", "diffrax_vjp", "isolated_vjp_s")):
      p = r[key]
      bpd = f"{p['bpd'][0]:.4f} +- {p['bpd'][1]:.4f}" if "bpd" in p else (
          f"(first {p['capped_steps']} steps only)")
      lines.append(
          f"| {r['model']} | {r['params']:,} | {label} | {p['nfe']} | "
          f"{1e3 * p['s_per_eval']:.1f} ms | {1e3 * r[iso]:.1f} ms | "
          f"{p['s_per_eval'] / r[iso]:.2f} | {p['total_s']:.2f} | {bpd} |")
  lines += ["", "| model | host / device (tsit5), total time | host / device (dopri5), "
            "total time | host / device (tsit5), per evaluation "
            "| vjp / jvp per evaluation in the solve | diffrax - scipy bits/dim, in stderr |",
            "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['host_over_device_total']:.2f}x | "
                 f"{r['host_over_dopri5_total']:.2f}x | "
                 f"{r['host_over_device_per_eval']:.2f}x | "
                 f"{r['diffrax_vjp']['s_per_eval'] / r['diffrax_jvp']['s_per_eval']:.2f}x | "
                 f"{r['bpd_diff_in_stderr']:.2f} |")
  return "\n".join(lines)


STUDY_TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6)


def trained_workdir(get_config, workdir: str, steps: int) -> str:
  """workdir after training get_config() for ``steps`` steps there (reused when done)."""
  from diffode_jax import run

  config = get_config()
  config.training.num_steps = steps
  config.training.checkpoint_every = steps
  config.training.tensorboard = False
  start = time.perf_counter()
  run.train(config, workdir)
  print(f"{workdir}: trained or reused in {time.perf_counter() - start:.0f} s", file=sys.stderr)
  return workdir


def study_model(label: str, workdir: str, num_images: int, batch: int, shards=()):
  """One model's rows of the tolerance study (same images and keys at every tolerance)."""
  import diffode_jax as dj

  model = dj.load(workdir)
  images = data.load_split(model.config.data, "test").images[:num_images]
  key = dj.eval_key(model.config)
  # The results name the workdir as a user's checkout would (relative to the repository).
  repo = os.path.dirname(os.path.dirname(RESULTS))
  shown = os.path.abspath(workdir)
  if shown.startswith(repo + os.sep):
    shown = os.path.relpath(shown, repo)
  out = {"model": label, "workdir": shown, "checkpoint_step": model.step,
         "images": len(images), "batch": batch, "rows": []}
  per_image = {}
  for tol in STUDY_TOLERANCES:
    start = time.perf_counter()
    bpd, report = model.bpd(images, key, batch_size=batch, rtol=tol, atol=tol)
    per_image[tol] = bpd
    out["rows"].append({"tol": tol, "bpd": report["bpd"], "bpd_stderr": report["bpd_stderr"],
                        "nfe": report["nfe_mean"], "seconds": time.perf_counter() - start})
    print(f"{label} tol {tol:g}: {report['bpd']:.4f} NFE {report['nfe_mean']:.0f}",
          file=sys.stderr)
  ref = per_image[min(STUDY_TOLERANCES)]
  for row in out["rows"]:
    diff = per_image[row["tol"]] - ref
    row["mean_minus_ref"] = float(diff.mean())
    row["max_abs_image_minus_ref"] = float(np.abs(diff).max())
    row["mean_abs_image_minus_ref"] = float(np.abs(diff).mean())
  if shards:  # per-shard step-size control: each shard of the first batch solved alone
    settings = model.eval_settings()
    c = model.components
    log_prob = make_log_prob_fn(c.drift, c.schedule, c.num_levels, settings)
    first = jnp.asarray(images[:batch])
    bkey = jax.random.fold_in(key, 0)
    whole = log_prob(model.params, first, bkey)
    out["global_nfe"] = int(whole.nfe[0])
    out["shards"] = []
    for n in shards:
      size = batch // n
      nfes = [int(log_prob(model.params, first[i * size:(i + 1) * size], bkey).nfe[0])
              for i in range(n)]
      out["shards"].append({"shards": n, "shard_size": size, "nfe": nfes})
  return out


def study_table(models, header) -> str:
  lines = [header, "",
           "| model | rtol = atol | bits/dim | mean - mean at 1e-6 | largest per-image "
           "difference from 1e-6 | mean per-image difference | NFE | NFE / NFE at 1e-5 "
           "| seconds |", "|---|---|---|---|---|---|---|---|---|"]
  for m in models:
    nfe5 = next(r["nfe"] for r in m["rows"] if r["tol"] == 1e-5)
    for r in m["rows"]:
      lines.append(f"| {m['model']} | {r['tol']:g} | {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} "
                   f"| {r['mean_minus_ref']:+.4f} | {r['max_abs_image_minus_ref']:.4f} "
                   f"| {r['mean_abs_image_minus_ref']:.4f} | {r['nfe']:.0f} "
                   f"| {r['nfe'] / nfe5:.2f} | {r['seconds']:.0f} |")
  for m in models:
    if "shards" in m:
      lines += ["", f"{m['model']}, first batch of {m['batch']} at rtol = atol = 1e-5: one "
                f"global solve takes NFE {m['global_nfe']}; solved as independent shards "
                "(per-device step-size control):", "",
                "| shards | images each | NFE per shard | largest |", "|---|---|---|---|"]
      for sh in m["shards"]:
        lines.append(f"| {sh['shards']} | {sh['shard_size']} | "
                     f"{', '.join(map(str, sh['nfe']))} | {max(sh['nfe'])} |")
  return "\n".join(lines)


def run_study(args):
  from configs import photo_patches

  root = os.path.join(os.path.dirname(RESULTS), "..", "runs", "bench_tolerance")
  root = os.path.normpath(root)
  digits_dir = args.digits_workdir
  demo = os.path.normpath(os.path.join(os.path.dirname(RESULTS), "..", "runs", "digits_demo"))
  if digits_dir is None and os.path.isdir(os.path.join(demo, "checkpoints")):
    digits_dir = demo
  if digits_dir is None:
    digits_dir = trained_workdir(digits.get_config, os.path.join(root, "digits"),
                                 args.study_steps)
  photo_dir = trained_workdir(photo_patches.get_config, os.path.join(root, "photo_patches"),
                              args.study_steps)
  models = [study_model("digits (17 levels)", digits_dir, 128, 128, shards=(4, 8)),
            study_model("photo_patches (256 levels)", photo_dir, 64, 64)]
  device = jax.devices()[0]
  header = (f"Solver tolerance study on {device.platform} ({os.cpu_count()} CPUs), jax "
            f"{jax.__version__}: the same test images and keys (eval_bpd's) at every "
            f"tolerance, tn, K = 1, Rademacher, dopri5, EMA params; digits: "
            f"{models[0]['workdir']} step {models[0]['checkpoint_step']}, photo_patches: "
            f"{models[1]['workdir']} step {models[1]['checkpoint_step']}.")
  text = study_table(models, header)
  print(text)
  write_results("tolerance_study", text, {"args": vars(args), "models": models},
                f"digits {provenance.describe(dj_config(digits_dir).model)}; photo_patches "
                f"{provenance.describe(dj_config(photo_dir).model)}")


def run_exact(args):
  """Memory and time of the chunked exact trace on 8-bit photo tiles (D = 192)."""
  from configs import photo_patches

  config = photo_patches.get_config()
  config.model.dropout = 0.0
  config = finalize_config(config)
  components = build(config)
  root = os.path.normpath(os.path.join(os.path.dirname(RESULTS), "..", "runs",
                                       "bench_tolerance", "photo_patches"))
  if os.path.isdir(os.path.join(root, "checkpoints")):
    import diffode_jax as dj

    params, source = dj.load(root).params, f"{root} (EMA params)"
  else:  # a perturbed initialization: the zero-initialized output layer is trivial
    params = components.init_params(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [l + 0.02 * jnp.asarray(rng.standard_normal(l.shape),
                                                              l.dtype) for l in leaves])
    source = "initialization + N(0, 0.02^2) noise"
  test = data.load_split(config.data, "test").images
  x_all = (2.0 * jnp.asarray(test[:128], jnp.float32) + 1.0) / 256.0 - 1.0
  gamma = jnp.asarray(-5.0, jnp.float32)
  rows, reference = [], None
  for chunk in (None, 64, 16, 4):
    fn = jax.jit(lambda p, x, chunk=chunk: ode.drift_and_divergence(
        lambda y, g: components.drift(p, y, g), x, gamma, None, chunk))
    start = time.perf_counter()
    memory = fn.lower(params, x_all).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    x = x_all[:16]
    jax.block_until_ready(fn(params, x))  # compile at batch 16
    seconds, (_, div) = median_time(lambda: fn(params, x), 3)
    div = np.asarray(div)
    if reference is None:
      reference = div
    rows.append({"chunk": chunk or 192, "one_vmap": chunk is None,
                 "temp_bytes_batch128": int(memory.temp_size_in_bytes),
                 "compile_s_batch128": compile_s, "seconds_batch16": seconds,
                 "max_rel_diff": float(np.max(np.abs(div - reference) / np.abs(reference)))})
    print(f"chunk {chunk}: {rows[-1]}", file=sys.stderr)
  device = jax.devices()[0]
  header = (f"Exact trace (divergence=exact) of one drift evaluation on photo tiles "
            f"(8x8x3, D = 192) on {device.platform} ({os.cpu_count()} CPUs), jax "
            f"{jax.__version__}; network of configs/photo_patches.py ({source}); memory: "
            f"compiled temporaries at batch 128, time: median of 3 at batch 16.")
  lines = [header, "", "| basis tangents per pass | temporaries, batch 128 | seconds per "
           "evaluation, batch 16 | largest relative difference from the one vmap |",
           "|---|---|---|---|"]
  for r in rows:
    label = f"{r['chunk']} (one vmap, eval.exact_trace_chunk=None)" if r["one_vmap"] else (
        f"{r['chunk']} (eval.exact_trace_chunk={r['chunk']})")
    lines.append(f"| {label} | {r['temp_bytes_batch128'] / 2**20:.0f} MiB | "
                 f"{r['seconds_batch16']:.2f} | {r['max_rel_diff']:.1e} |")
  text = "\n".join(lines)
  print(text)
  write_results("exact_trace", text, {"source": source, "rows": rows},
                provenance.describe(config.model))


def dj_config(workdir):
  """The finalized config a trained workdir holds."""
  import diffode_jax as dj

  return dj.load(workdir).config


def write_results(stem: str, text: str, payload: dict, network: str) -> None:
  """bench/results/<stem>.md (the table) and <stem>.json (payload, with the platform, the
  code's commit and the network layout)."""
  device = jax.devices()[0]
  code = provenance.commit()
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{stem}.json"), "w") as f:
    json.dump({"platform": device.platform, "device_kind": device.device_kind,
               "jax": jax.__version__, "python": platform.python_version(), "commit": code,
               "network": network, **payload}, f, indent=2)
  with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
    f.write(text + f"\n\nCode: {code}; {network}.\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller networks and batch")
  parser.add_argument("--batch", type=int, default=None, help="test images per solve")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per path")
  parser.add_argument("--train-steps", type=int, default=None)
  parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of every solver")
  parser.add_argument("--vjp-steps", type=int, default=16,
                      help="solver steps timed for the (slow) vjp variant")
  parser.add_argument("--study", action="store_true", help="the solver tolerance study")
  parser.add_argument("--digits_workdir", default=None,
                      help="--study: a digits workdir (default runs/digits_demo if trained)")
  parser.add_argument("--study_steps", type=int, default=1000,
                      help="--study: training steps of the models it trains itself")
  parser.add_argument("--exact", action="store_true",
                      help="memory and time of the chunked exact trace")
  args = parser.parse_args()
  if args.study:
    return run_study(args)
  if args.exact:
    return run_exact(args)
  sizes = QUICK_SIZES if args.quick else SIZES
  args.batch = args.batch or 8
  args.train_steps = args.train_steps or (20 if args.quick else 40)

  rows = []
  for name, size in sizes.items():
    rows.append(bench_size(name, size, args))
    print(f"{name}: done", file=sys.stderr)
  device = jax.devices()[0]
  header = (f"Evaluation speed on {device.platform} ({device.device_kind}, "
            f"{os.cpu_count()} CPUs), jax {jax.__version__}, digits 8x8x1, batch "
            f"{args.batch}, tn dequantization, Rademacher probe, diffrax (tsit5, dopri5) vs scipy RK45, "
            f"rtol = atol = {args.tol:g}, median of {args.repeats} runs.")
  text = table(rows, header)
  print(text)
  base = digits.get_config().model
  write_results("eval_speed" + ("_quick" if args.quick else ""), text,
                {"args": vars(args), "rows": rows},
                f"configs/digits.py's {provenance.describe(base)}, with channels, num_blocks "
                f"and embed_dim of each size: "
                + "; ".join(f"{n} {c}, {b}, {e}" for n, (c, b, e) in sizes.items())
                + ", dropout 0")


if __name__ == "__main__":
  main()
