"""Likelihood per function evaluation: solver settings against a converged float64 reference.

    python bench/solver_study.py            # digits and 8-bit photo tiles, 128 test images each
    python bench/solver_study.py --quick    # 32 images, fewer candidates
    python bench/solver_study.py --model mine=runs/my_run   # any trained workdir(s)

For each model (``--model label=workdir``, repeated; default: the ``make demo`` digits
model in runs/digits_demo and an 8-bit photo tiles model, configs/photo_patches.py,
trained under runs/bench_solver/ for ``--train_steps`` if it has no checkpoint), on its
first ``--images`` test images in batches of eval.batch_size:

1. **The noise.** Batch b uses the key fold_in(eval_key, b) as ``--mode=eval_bpd`` does;
   its dequantization noise and Hutchinson probe (eval.divergence) are drawn once, in
   float32, by the library's ``likelihood.draw_noise`` and kept, so every solve below
   (reference and candidates) integrates the same ODE from the same start.
2. **The reference** (a subprocess with float64 enabled): the same bound solved with
   params, state and arithmetic in float64 by ``--ref_solver`` (dopri5) at rtol = atol =
   ``--ref_tol`` (1e-9) and again at half that tolerance; the largest per-image difference
   between the two is reported (it must be below 1e-4 bits/dim). **Conditioning**: the
   same solve from z0 + 1e-7 v (v a random sign per component): how far a per-image bound
   moves when the start moves by one float32 rounding step of a unit value.
3. **The candidates**, each through ``likelihood.make_log_prob_fn`` in float32 (the path a
   user's evaluation takes): the official host loop (``scipy_rk45``) at rtol = atol in
   1e-3 ... 1e-7, and diffrax solvers (dopri5, tsit5, bosh3, dopri8), error norms
   (``ode.error_norm``), PID step-size controllers and time variables
   (``ode.TIME_VARIABLES``). Per candidate: NFE per batch (mean), the per-image error
   against the reference in bits/dim (mean of |error|, its 95th percentile, the mean
   signed error) and seconds.
4. **Sampling**: the reverse solve of one batch of prior noise, the float64
   reference (``--ref_solver`` at ``--ref_tol``) against candidates: NFE and the RMS endpoint error in bin
   widths (2 / V in data units).

Writes bench/results/solver_study.{md,json} (``solver_study_quick`` with --quick) and one
Pareto plot per model, solver_study_<label>.png (error against NFE). Caches the noise,
the reference and each candidate's rows under runs/bench_solver/<label>/, keyed by the
model's params fingerprint, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(ROOT, "runs", "bench_solver")
PERTURBATION = 1e-7

# (family label, SolverConfig fields, tolerances): every candidate of the chart.
OFFICIAL_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
FULL = (
    ("scipy_rk45 (official)", {"solver": "scipy_rk45"}, OFFICIAL_TOLS),
    ("dopri5", {"solver": "dopri5"}, OFFICIAL_TOLS),
    ("tsit5", {"solver": "tsit5"}, (1e-4, 1e-5)),
    ("bosh3", {"solver": "bosh3"}, (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6)),
    ("bosh3, time angle", {"solver": "bosh3", "time": "angle"}, (1e-4, 3e-5)),
    ("bosh3, norm leaf_max", {"solver": "bosh3", "norm": "leaf_max"}, (1e-4, 3e-5)),
    ("bosh3, PID 0.3/0.4", {"solver": "bosh3", "pcoeff": 0.3, "icoeff": 0.4}, (1e-4,)),
    ("dopri8", {"solver": "dopri8"}, (1e-5, 1e-6)),
    ("dopri5, norm image_max", {"norm": "image_max"}, (1e-4, 1e-5)),
    ("dopri5, norm leaf_max", {"norm": "leaf_max"}, (1e-4, 1e-5, 1e-6)),
    ("dopri5, PID 0.3/0.4", {"pcoeff": 0.3, "icoeff": 0.4}, (1e-4, 1e-5)),
    ("dopri5, time sigma", {"time": "sigma"}, (1e-4, 1e-5)),
    ("dopri5, time angle", {"time": "angle"}, (1e-4, 1e-5)),
    ("dopri5, time rho7", {"time": "rho7"}, (1e-4,)),
)
QUICK = (
    ("scipy_rk45 (official)", {"solver": "scipy_rk45"}, (1e-4, 1e-5)),
    ("dopri5", {"solver": "dopri5"}, (1e-4, 1e-5)),
    ("dopri5, norm image_max", {"norm": "image_max"}, (1e-4,)),
    ("dopri5, time angle", {"time": "angle"}, (1e-4,)),
)
SAMPLE_CANDIDATES = (
    ("dopri5", {"solver": "dopri5"}, (1e-3, 1e-4, 1e-5, 1e-6)),
    ("tsit5", {"solver": "tsit5"}, (1e-3, 1e-4, 1e-5)),
    ("bosh3", {"solver": "bosh3"}, (1e-3, 1e-4, 1e-5)),
    ("dopri5, time angle", {"time": "angle"}, (1e-3, 1e-4, 1e-5)),
    ("dopri5, time sigma", {"time": "sigma"}, (1e-3, 1e-4, 1e-5)),
)


def candidate_name(family: str, tol: float) -> str:
  return f"{family} @ {tol:g}"


def solver_config(fields: dict, tol: float, base=None):
  from diffode_jax import ode

  base = base or ode.SolverConfig()
  return dataclasses.replace(base, rtol=tol, atol=tol, **fields)


# ---------------------------------------------------------------------------- files


def _save(path: str, **arrays) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _load(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _json_rows(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------- models


def trained(label: str, workdir: str, steps: int) -> str:
  """workdir, trained here first when it is a default model without a checkpoint."""
  from diffode_jax import checkpoint, paths

  if checkpoint.committed_steps(paths.checkpoint_dir(workdir)):
    return workdir
  getters = {"digits": "digits", "photo_patches": "photo_patches"}
  if label not in getters:
    raise SystemExit(f"{workdir} has no checkpoint (train it first, or use the label digits "
                     f"or photo_patches for a model trained here)")
  from diffode_jax import run
  import importlib

  config = importlib.import_module(f"configs.{getters[label]}").get_config()
  config.training.num_steps = steps
  config.training.checkpoint_every = steps
  config.training.tensorboard = False
  print(f"{label}: training {workdir} for {steps} steps", file=sys.stderr)
  run.train(config, workdir)
  return workdir


def model_inputs(label: str, workdir: str, num_images: int, cache: str) -> dict:
  """The images of the study and each batch's noise (float32), cached in noise.npz."""
  import diffode_jax as dj
  from diffode_jax import data, likelihood

  model = dj.load(workdir)
  fingerprint = _fingerprint(model.params)
  path = os.path.join(cache, "noise.npz")
  kept = _load(path)
  if kept is not None and str(kept["fingerprint"]) == fingerprint \
      and len(kept["images"]) == num_images:
    return kept
  config = model.config
  c = model.components
  images = np.asarray(data.load_split(config.data, "test").images[:num_images])
  settings = model.eval_settings()
  batch = min(int(config.eval.batch_size), num_images)
  key = dj.eval_key(config)
  z0s, weights, probes, gammas = [], [], [], []
  draw = jax.jit(lambda k, kk: likelihood.draw_noise(settings, c.schedule, c.num_levels, k, kk))
  for b, start in enumerate(range(0, num_images, batch)):
    k = jnp.asarray(images[start:start + batch])
    deq, probe = draw(k, jax.random.fold_in(jax.random.fold_in(key, b), 0))
    z0s.append(np.asarray(deq.z0))
    weights.append(np.asarray(deq.log_weight))
    probes.append(np.zeros_like(z0s[-1]) if probe is None else np.asarray(probe))
    gammas.append(deq.gamma0)
  out = dict(images=images, z0=np.concatenate(z0s), log_weight=np.concatenate(weights),
             probe=np.concatenate(probes), gamma0=np.float64(gammas[0]), batch=np.int64(batch),
             fingerprint=np.str_(fingerprint), exact=np.bool_(settings.divergence == "exact"))
  _save(path, **out)
  return out


def _fingerprint(params) -> str:
  from diffode_jax.fingerprint import params_fingerprint

  return params_fingerprint(params)


# ---------------------------------------------------------------------------- reference


def reference_stage(workdir: str, cache: str, tol: float, solver: str) -> None:
  """(float64, in a subprocess) the reference bounds, their halving check and conditioning."""
  import diffode_jax as dj
  from diffode_jax import ode
  from diffode_jax.likelihood import prior_log_density

  assert jax.config.jax_enable_x64, "the reference stage runs with JAX_ENABLE_X64=1"
  inputs = _load(os.path.join(cache, "noise.npz"))
  model = dj.load(workdir)
  c = model.components
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
  exact = bool(inputs["exact"])
  chunk = model.eval_settings().exact_trace_chunk
  dim = int(np.prod(inputs["z0"].shape[1:]))
  gamma0, gamma1 = float(inputs["gamma0"]), float(c.schedule.gamma_max)

  def bound(z0, probe, log_weight, rtol):
    field = ode.augmented_vector_field(lambda x, g: c.drift(params, x, g),
                                       None if exact else probe, chunk)
    cfg = ode.SolverConfig(solver=solver, rtol=rtol, atol=rtol, max_steps=100_000)
    (x1, delta), nfe, ok = ode.solve_diffrax(field, (z0, jnp.zeros(z0.shape[0])), gamma0,
                                             gamma1, cfg)
    return prior_log_density(x1, c.schedule) + delta + log_weight, nfe, ok

  solve = jax.jit(bound, static_argnums=3)
  path = os.path.join(cache, "reference.npz")
  batch = int(inputs["batch"])
  out: dict[str, list] = {"ref": [], "half": [], "perturbed": [], "nfe_ref": [], "nfe_half": []}
  sign = jax.random.rademacher(jax.random.PRNGKey(7), inputs["z0"].shape, jnp.float64)
  for start in range(0, len(inputs["z0"]), batch):
    sl = slice(start, start + batch)
    z0 = jnp.asarray(inputs["z0"][sl], jnp.float64)
    probe = jnp.asarray(inputs["probe"][sl], jnp.float64)
    lw = jnp.asarray(inputs["log_weight"][sl], jnp.float64)
    t = time.perf_counter()
    ref, nfe, ok = solve(z0, probe, lw, tol)
    half, nfe_h, ok_h = solve(z0, probe, lw, tol / 2)
    pert, _, ok_p = solve(z0 + PERTURBATION * sign[sl], probe, lw, tol)
    assert bool(ok) and bool(ok_h) and bool(ok_p), "the float64 reference solve failed"
    for name, v in (("ref", ref), ("half", half), ("perturbed", pert)):
      out[name].append(np.asarray(v))
    out["nfe_ref"].append(int(nfe))
    out["nfe_half"].append(int(nfe_h))
    print(f"reference batch at {start}: NFE {int(nfe)} / {int(nfe_h)} "
          f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
  to_bpd = lambda v: -np.concatenate(v) / (dim * math.log(2))
  _save(path, bpd=to_bpd(out["ref"]), bpd_half=to_bpd(out["half"]),
        bpd_perturbed=to_bpd(out["perturbed"]), nfe_ref=np.array(out["nfe_ref"]),
        nfe_half=np.array(out["nfe_half"]), tol=np.float64(tol), solver=np.str_(solver),
        fingerprint=inputs["fingerprint"])


def sample_reference_stage(workdir: str, cache: str, tol: float, batch: int,
                           solver: str) -> None:
  """(float64, in a subprocess) the reverse solve of one batch of prior noise."""
  import diffode_jax as dj
  from diffode_jax import data, ode

  model = dj.load(workdir)
  c = model.components
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
  shape = (batch,) + data.image_shape(model.config.data)
  x1 = np.asarray(c.schedule.sigma(jnp.float32(c.schedule.gamma_max))) * np.asarray(
      jax.random.normal(jax.random.PRNGKey(11), shape, jnp.float32))
  cfg = ode.SolverConfig(solver=solver, rtol=tol, atol=tol, max_steps=100_000)
  solve = jax.jit(lambda x: ode.solve_diffrax(lambda g, y, a: c.drift(params, y, g), x,
                                              c.schedule.gamma_max, c.schedule.gamma_min, cfg))
  z0, nfe, ok = solve(jnp.asarray(x1, jnp.float64))
  assert bool(ok), "the float64 reverse solve failed"
  _save(os.path.join(cache, "sample_reference.npz"), x1=x1.astype(np.float32),
        z0=np.asarray(z0), nfe=np.int64(nfe))


def run_reference(stage: str, workdir: str, cache: str, args) -> None:
  env = dict(os.environ, JAX_ENABLE_X64="1")
  cmd = [sys.executable, os.path.abspath(__file__), f"--stage={stage}", f"--workdir={workdir}",
         f"--cache={cache}", f"--ref_tol={args.ref_tol}", f"--ref_solver={args.ref_solver}",
         f"--sample_batch={args.sample_batch}"]
  subprocess.run(cmd, check=True, env=env)


# ---------------------------------------------------------------------------- candidates


def likelihood_candidates(workdir: str, inputs: dict, ref: dict, candidates, cache: str) -> dict:
  """{candidate: row} of every candidate (cached per candidate in candidates.json)."""
  import diffode_jax as dj
  from diffode_jax.likelihood import make_log_prob_fn

  path = os.path.join(cache, "candidates.json")
  kept = _json_rows(path)
  if kept.get("fingerprint") != str(inputs["fingerprint"]) \
      or kept.get("images") != len(inputs["images"]):
    kept = {"fingerprint": str(inputs["fingerprint"]), "images": len(inputs["images"]),
            "rows": {}}
  model = dj.load(workdir)
  c = model.components
  base = model.eval_settings()
  key = dj.eval_key(model.config)
  images, batch = inputs["images"], int(inputs["batch"])
  for family, fields, tols in candidates:
    for tol in tols:
      name = candidate_name(family, tol)
      if name in kept["rows"]:
        continue
      settings = dataclasses.replace(base, solver=solver_config(fields, tol, base.solver))
      log_prob = make_log_prob_fn(c.drift, c.schedule, c.num_levels, settings)
      bpd, nfes, ok = [], [], True
      log_prob(model.params, jnp.asarray(images[:batch]), jax.random.fold_in(key, 0))  # compile
      t = time.perf_counter()
      for b, start in enumerate(range(0, len(images), batch)):
        res = log_prob(model.params, jnp.asarray(images[start:start + batch]),
                       jax.random.fold_in(key, b))
        bpd.append(-res.log_prob / (c.dim * math.log(2)))
        nfes.append(res.nfe[0])
        ok = ok and res.success
      seconds = time.perf_counter() - t
      err = np.concatenate(bpd) - ref["bpd"]
      kept["rows"][name] = {
          "family": family, "tol": tol, "nfe": float(np.mean(nfes)), "nfe_batches": nfes,
          "mean_abs_error": float(np.abs(err).mean()),
          "p95_abs_error": float(np.percentile(np.abs(err), 95)),
          "max_abs_error": float(np.abs(err).max()), "mean_error": float(err.mean()),
          "seconds": seconds, "success": bool(ok), "bpd": float(np.concatenate(bpd).mean())}
      r = kept["rows"][name]
      print(f"  {name}: NFE {r['nfe']:.0f}, mean |err| {r['mean_abs_error']:.2e}, p95 "
            f"{r['p95_abs_error']:.2e} ({seconds:.0f} s)", file=sys.stderr)
      _write_json(path, kept)
  return kept["rows"]


def sample_candidates(workdir: str, sref: dict, cache: str) -> dict:
  import diffode_jax as dj
  from diffode_jax import ode

  path = os.path.join(cache, "sample_candidates.json")
  kept = _json_rows(path)
  model = dj.load(workdir)
  c = model.components
  fingerprint = _fingerprint(model.params)
  if kept.get("fingerprint") != fingerprint:
    kept = {"fingerprint": fingerprint, "rows": {}}
  x1 = jnp.asarray(sref["x1"])
  alpha0 = float(c.schedule.alpha(jnp.float32(c.schedule.gamma_min)))
  bin_width = 2.0 / c.num_levels
  ref_levels = sref["z0"] / alpha0
  for family, fields, tols in SAMPLE_CANDIDATES:
    for tol in tols:
      name = candidate_name(family, tol)
      if name in kept["rows"]:
        continue
      cfg = ode.scaled_tolerances(solver_config(fields, tol), c.schedule.gamma_min)
      solve = jax.jit(lambda x, cfg=cfg: ode.solve_diffrax(
          lambda g, y, a: c.drift(model.params, y, g), x, c.schedule.gamma_max,
          c.schedule.gamma_min, cfg))
      z0, nfe, ok = solve(x1)
      err = (np.asarray(z0, np.float64) / alpha0 - ref_levels) / bin_width
      kept["rows"][name] = {"family": family, "tol": tol, "nfe": int(nfe), "success": bool(ok),
                            "rms_error_bins": float(np.sqrt(np.mean(err**2))),
                            "max_error_bins": float(np.abs(err).max())}
      _write_json(path, kept)
  return kept["rows"]


# ---------------------------------------------------------------------------- report


def pareto_plot(label: str, rows: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
  families: dict[str, list] = {}
  for r in rows.values():
    families.setdefault(r["family"], []).append(r)
  colors = plt.get_cmap("tab20").colors
  for i, (family, rs) in enumerate(families.items()):
    rs = sorted(rs, key=lambda r: r["nfe"])
    style = dict(marker="o", lw=2.5, color="black") if family.startswith("scipy") else \
        dict(marker="s^vD."[i % 5], lw=1, color=colors[(2 * i + i // 10) % 20])
    for ax, field in zip(axes, ("mean_abs_error", "p95_abs_error")):
      ax.plot([r["nfe"] for r in rs], [max(r[field], 1e-9) for r in rs], label=family, **style)
  for ax, title in zip(axes, ("mean |error| (bits/dim)", "95th percentile of |error|")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE per batch")
    ax.set_title(f"{label}: {title}")
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def model_section(label: str, workdir: str, info: dict) -> list[str]:
  rows, ref, sample = info["rows"], info["reference"], info["sample"]
  official = rows[candidate_name("scipy_rk45 (official)", 1e-5)] \
      if candidate_name("scipy_rk45 (official)", 1e-5) in rows else None
  lines = [f"### {label}", "",
           f"{workdir}, step {info['step']}, {info['images']} test images in batches of "
           f"{info['batch']}, V = {info['num_levels']}, D = {info['dim']}, divergence "
           f"{info['divergence']}; {info['network']}.", "",
           f"- reference: float64 {ref['solver']} at rtol = atol = {ref['tol']:g} (NFE per batch "
           f"{np.mean(ref['nfe_ref']):.0f}); at half that tolerance the largest per-image change "
           f"is {info['halving']:.1e} bits/dim (mean bits/dim {info['ref_bpd']:.4f}).",
           f"- conditioning: moving z0 by {PERTURBATION:g} per component (random signs) moves "
           f"the per-image bound by {info['cond_median']:.1e} bits/dim (median), "
           f"{info['cond_max']:.1e} (largest).", "",
           "| candidate | NFE | NFE / official 1e-5 | mean abs error | p95 abs error | "
           "largest | mean error | seconds |", "|---|---|---|---|---|---|---|---|"]
  for name, r in sorted(rows.items(), key=lambda kv: (kv[1]["family"], -kv[1]["tol"])):
    ratio = f"{r['nfe'] / official['nfe']:.2f}" if official else "-"
    flag = "" if r["success"] else " (failed)"
    lines.append(f"| {name}{flag} | {r['nfe']:.0f} | {ratio} | {r['mean_abs_error']:.2e} | "
                 f"{r['p95_abs_error']:.2e} | {r['max_abs_error']:.2e} | {r['mean_error']:+.1e} | "
                 f"{r['seconds']:.1f} |")
  if sample:
    lines += ["", f"Sampling, one batch of {info['sample_batch']} (reference NFE "
              f"{info['sample_ref_nfe']}): endpoint error in bin widths (2/V).", "",
              "| candidate | NFE | RMS error (bins) | largest (bins) |", "|---|---|---|---|"]
    for name, r in sorted(sample.items(), key=lambda kv: (kv[1]["family"], -kv[1]["tol"])):
      lines.append(f"| {name} | {r['nfe']} | {r['rms_error_bins']:.2e} | "
                   f"{r['max_error_bins']:.2e} |")
  lines += ["", f"![{label}](solver_study_{label}.png)", ""]
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", action="append", default=None,
                      help="label=workdir (repeat); default digits and photo_patches")
  parser.add_argument("--images", type=int, default=None, help="test images per model")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--train_steps", type=int, default=3000)
  parser.add_argument("--ref_tol", type=float, default=1e-9)
  parser.add_argument("--ref_solver", default="dopri5",
                      help="float64 reference solver (dopri5 needed fewer NFE than dopri8 "
                           "for the same halving change on the digits model)")
  parser.add_argument("--sample_batch", type=int, default=16)
  parser.add_argument("--no_sample", action="store_true")
  parser.add_argument("--families", default=None,
                      help="semicolon-separated candidate families to run (default: all), "
                           "e.g. 'scipy_rk45 (official);bosh3'")
  parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.stage == "reference":
    return reference_stage(args.workdir, args.cache, args.ref_tol, args.ref_solver)
  if args.stage == "sample_reference":
    return sample_reference_stage(args.workdir, args.cache, args.ref_tol, args.sample_batch,
                                  args.ref_solver)
  import diffode_jax as dj

  code = provenance.commit()  # before this run writes its own result files
  num_images = args.images or (32 if args.quick else 128)
  candidates = QUICK if args.quick else FULL
  if args.families:
    chosen = args.families.split(";")
    unknown = sorted(set(chosen) - {family for family, _, _ in candidates})
    if unknown:
      parser.error(f"unknown families {unknown}; choose from "
                   f"{[family for family, _, _ in candidates]}")
    candidates = tuple(c for c in candidates if c[0] in chosen)
  specs = args.model or ["digits=runs/digits_demo",
                         "photo_patches=runs/bench_solver/photo_patches_model"]
  stem = "solver_study_quick" if args.quick else "solver_study"
  sections, payload = [], {"models": {}}
  for spec in specs:
    label, _, workdir = spec.partition("=")
    cache = os.path.join(CACHE, label + ("_quick" if args.quick else ""))
    workdir = trained(label, workdir, args.train_steps)
    inputs = model_inputs(label, workdir, num_images, cache)
    ref = _load(os.path.join(cache, "reference.npz"))
    if ref is None or str(ref["fingerprint"]) != str(inputs["fingerprint"]) \
        or float(ref["tol"]) != args.ref_tol or str(ref.get("solver")) != args.ref_solver:
      run_reference("reference", workdir, cache, args)
      ref = _load(os.path.join(cache, "reference.npz"))
    print(f"{label}: reference {ref['bpd'].mean():.4f} bits/dim", file=sys.stderr)
    rows = likelihood_candidates(workdir, inputs, ref, candidates, cache)
    sample = {}
    if not args.no_sample and not args.quick:
      if _load(os.path.join(cache, "sample_reference.npz")) is None:
        run_reference("sample_reference", workdir, cache, args)
      sref = _load(os.path.join(cache, "sample_reference.npz"))
      sample = sample_candidates(workdir, sref, cache)
    model = dj.load(workdir)
    cond = np.abs(ref["bpd_perturbed"] - ref["bpd"])
    info = {"rows": rows, "reference": {k: ref[k].tolist() for k in ("tol", "solver", "nfe_ref",
                                                                      "nfe_half")},
            "sample": sample, "step": model.step, "images": len(inputs["images"]),
            "batch": int(inputs["batch"]), "num_levels": model.components.num_levels,
            "dim": model.components.dim, "divergence": model.eval_settings().divergence,
            "network": provenance.describe(model.config.model),
            "halving": float(np.abs(ref["bpd_half"] - ref["bpd"]).max()),
            "ref_bpd": float(ref["bpd"].mean()), "cond_median": float(np.median(cond)),
            "cond_max": float(cond.max()), "sample_batch": args.sample_batch,
            "sample_ref_nfe": (int(_load(os.path.join(cache, "sample_reference.npz"))["nfe"])
                               if sample else None)}
    payload["models"][label] = info
    sections += model_section(label, workdir, info)
    os.makedirs(RESULTS, exist_ok=True)
    pareto_plot(label, rows, os.path.join(RESULTS, f"{stem}_{label}.png"
                                          if args.quick else f"solver_study_{label}.png"))
  device = jax.devices()[0]
  text = "\n".join(["Per-image error of the likelihood bound against a float64 reference, "
                    "by NFE (bench/solver_study.py).", ""] + sections)
  with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
    f.write(text + f"\nCode: {code}.\n")
  _write_json(os.path.join(RESULTS, f"{stem}.json"),
              {"platform": device.platform, "device_kind": device.device_kind,
               "jax": jax.__version__, "python": platform.python_version(), "commit": code,
               **payload})


if __name__ == "__main__":
  main()
