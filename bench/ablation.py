"""The paper's ablation at small scale, on the embedded digits and photo_patches data.

    python bench/ablation.py                 # full run: about 2.5 hours on 2 CPU cores
    python bench/ablation.py --quick         # reduced budget, minutes
    python bench/ablation.py --budget=long --datasets=digits   # the best digits setting, 4x the steps, ~50 min
    python bench/ablation.py --paired        # per-image values for the paired differences
                                             # (of the --settings given, else of all)
    python bench/ablation.py --budget=long --datasets=photo_patches   # issue 16, hours

Every setting trains the same network with the same steps, batch and seed
(configs/digits.py or configs/photo_patches.py) and differs only in the technique:

| setting | what changes |
|---|---|
| eps, uniform t | eps parameterization, uniform time (the baseline) |
| velocity, uniform t | velocity parameterization, likelihood weighting, uniform time |
| velocity, IS | + importance sampling of time (the i-DODE default) |
| velocity, IS, SP | the same on the straight-path schedule |
| velocity, IS, train u-deq | trained on uniformly dequantized data (ScoreFlow) (issue 5) |
| velocity, IS + 2nd order | "velocity, IS" fine-tuned with the second-order loss for 10% more steps |
| velocity, IS + 1st order | its control: the same fine-tune with the first-order loss |

Each final EMA model is evaluated on the test images with `tn`, `u` and `v`
dequantization (K = 1) and the VDM ELBO (`sde_bpd`), and with `tn` at K = 8 and K = 1 on
the same smaller subset (paired).
Test bits/dim (`tn`, on a subset) is also recorded along training to show convergence
speed. Classical baselines on the same splits: bench/baselines.py.

The 8-bit photo tiles cost several times more per ODE evaluation than the digits (three
channels and a much stiffer flow near t = 0), so their full budget evaluates fewer test
images (128, and K = 8 on 16) and records the curve every 1000 steps on 32.

``--budget=long --datasets=photo_patches`` (issue 16) trains the bin-centre model
("velocity, IS") and the uniform-trained one 4x longer, records tn, u and the ELBO of the
same 32 test tiles with the NFE of evaluation and of sampling every 2000 steps, then the
bin-centre model's second-order fine-tune and its first-order control; the table adds
paired differences (per-image means +- standard errors) and tn_minus_u_<data>_long.png
plots tn - u, the ODE - ELBO gap and the NFE against the steps. Run the two trainings as
two processes (the results file is shared under a lock):

    python bench/ablation.py --budget=long --datasets=photo_patches \
        --settings="velocity, IS;velocity, IS + 2nd order" &
    python bench/ablation.py --budget=long --datasets=photo_patches --wait \
        --settings="velocity, IS, train u-deq;velocity, IS + 1st order"

Training resumes from the runs folder and finished results are cached per data set in
bench/results/ablation_<data>.json, so an interrupted run continues and the two data sets
can run as two processes at once. Writes ablation_<data>.json, convergence_<data>.png and
the combined table ablation.md (``_quick`` or ``_long`` in every name with those budgets).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffode_jax as dj  # noqa: E402
from baselines import categorical_bpd, gmm_bits, gmm_bpd  # noqa: E402
import provenance  # noqa: E402
from provenance import commit  # noqa: E402
from configs import digits, photo_patches  # noqa: E402
from diffode_jax import data as data_lib  # noqa: E402
from diffode_jax import run  # noqa: E402
from diffode_jax.config import sample_settings  # noqa: E402
from diffode_jax.likelihood import bits_per_dim, make_sde_fn  # noqa: E402
from diffode_jax.sampling import draw, make_sample_fn  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DATASETS = {"digits": digits.get_config, "photo_patches": photo_patches.get_config}
SETTINGS = {
    "eps, uniform t": {"model.parameterization": "eps",
                       "training.importance_sampling": False},
    "velocity, uniform t": {"training.importance_sampling": False},
    "velocity, IS": {},
    "velocity, IS, SP": {"model.schedule": "SP"},
    "velocity, IS, train u-deq": {"training.dequantization": "u"},
    "velocity, IS + 2nd order": {"model.second_order": True},  # fine-tunes "velocity, IS"
    # The control of the fine-tune: the same extra steps with the first-order loss.
    "velocity, IS + 1st order": {},
}
FINETUNE_FROM = {"velocity, IS + 2nd order": "velocity, IS",
                 "velocity, IS + 1st order": "velocity, IS"}
LONG_SETTING = "velocity, IS, SP"  # the best setting of the full budget on digits
# (dequantization, K, image set): K = 8 runs on a subset, so K = 1 is repeated on that
# same subset for a paired comparison.
ALL_EVALS = [("tn", 1, "test"), ("u", 1, "test"), ("v", 1, "test"), ("tn", 8, "k8"),
             ("tn", 1, "k8")]
# Per data set: budget of every setting, and which evaluations of ALL_EVALS to run.
BUDGETS = {
    "quick": {
        "digits": {"steps": 600, "interval": 200, "curve_images": 64, "test_images": 128,
                   "k8_images": 32, "evals": ALL_EVALS},
        "photo_patches": {"steps": 600, "interval": 200, "curve_images": 32,
                          "test_images": 64, "k8_images": 16, "evals": ALL_EVALS[:2]},
    },
    "full": {
        "digits": {"steps": 3000, "interval": 500, "curve_images": 128, "test_images": 360,
                   "k8_images": 64, "evals": ALL_EVALS},
        "photo_patches": {"steps": 3000, "interval": 1000, "curve_images": 32,
                          "test_images": 128, "k8_images": 16, "evals": ALL_EVALS},
    },
    # Four times the full budget, for the best setting only: how far the digits go when
    # training continues (the full-budget curves are all still falling at step 3000).
    "long": {
        "digits": {"steps": 12000, "interval": 1500, "curve_images": 128,
                   "test_images": 360, "k8_images": 64, "evals": ALL_EVALS},
        # Issue 16: does tn beat u on 8-bit data once the model has trained? The curve
        # records tn, u and the ELBO of the same images (paired) and the NFE of
        # evaluation and of sampling; the final evaluation uses the full budget's 128
        # test images, on which the Gaussian mixture baseline is fitted.
        "photo_patches": {"steps": 12000, "interval": 2000, "curve_images": 32,
                          "curve_deqs": ["tn", "u"], "sample_images": 8,
                          "test_images": 128, "k8_images": 16, "evals": ALL_EVALS[:2]},
    },
}
# The settings each data set runs with --budget=long: the best digits setting; on the
# photo tiles the bin-centre model against the uniform-trained one, then the bin-centre
# model's second-order fine-tune and its first-order control.
LONG_SETTINGS = {
    "digits": [LONG_SETTING],
    "photo_patches": ["velocity, IS", "velocity, IS, train u-deq",
                      "velocity, IS + 2nd order", "velocity, IS + 1st order"],
}


def network_fields(dataset):
  return provenance.network(DATASETS[dataset]().model)


def _eval_name(deq, k, subset):
  return f"{deq}_K{k}" + ("_k8set" if subset == "k8" and k == 1 else "")


def _set(config, dotted, value):
  node = config
  *path, leaf = dotted.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value


def make_config(dataset, setting, budget):
  config = DATASETS[dataset]()
  config.training.num_steps = budget["steps"]
  config.training.checkpoint_every = budget["interval"]
  config.training.log_every = min(100, budget["interval"])
  for dotted, value in SETTINGS[setting].items():
    _set(config, dotted, value)
  return config


def _slug(text):
  return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def fixed_subset(images, n, seed=0):
  """A fixed subset of n images (sorted indices of a seeded permutation)."""
  idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
  return images[idx]


def curve_point(model, images, budget, step):
  """One point of the training curve on the fixed subset ``images``.

  Plain budgets: tn bits/dim. Budgets with ``curve_deqs``: every listed dequantization
  with its per-image bound, the per-image ELBO (sde_bpd) of the same images and key, the
  mean NFE, and the NFE of drawing ``sample_images`` samples (one batch).
  """
  if not budget.get("curve_deqs"):
    _, report = model.bpd(images, jax.random.PRNGKey(1), dequantization="tn")
    point = {"step": step, "bpd": report["bpd"], "bpd_stderr": report["bpd_stderr"]}
    print(f"  step {step}: tn {point['bpd']:.4f} (curve subset)", flush=True)
    return point
  point = {"step": step}
  for deq in budget["curve_deqs"]:
    start = time.perf_counter()
    rows, report = model.per_image(images, jax.random.PRNGKey(1), dequantization=deq)
    point[deq] = {"bpd": report["bpd"], "bpd_stderr": report["bpd_stderr"],
                  "nfe_mean": report["nfe_mean"], "seconds": time.perf_counter() - start,
                  "per_image": [r["bpd"] for r in rows]}
  elbo = elbo_per_image(model, images, budget.get("elbo_draws", 16))
  point["sde"] = {"bpd": float(elbo.mean()),
                  "bpd_stderr": float(elbo.std(ddof=1) / np.sqrt(len(elbo))),
                  "draws": budget.get("elbo_draws", 16), "per_image": elbo.tolist()}
  point["bpd"], point["bpd_stderr"] = point["tn"]["bpd"], point["tn"]["bpd_stderr"]
  n = budget.get("sample_images", 0)
  if n:
    c = model.components
    shape = (n,) + data_lib.image_shape(model.config.data)
    sample_fn = make_sample_fn(c.drift, c.schedule, c.num_levels, shape,
                               sample_settings(model.config))
    _, nfes = draw(sample_fn, model.params, jax.random.PRNGKey(3), n, n)
    point["sample_nfe"] = float(np.mean(nfes))
  print(f"  step {step}: " + ", ".join(f"{d} {point[d]['bpd']:.4f} (NFE {point[d]['nfe_mean']:.0f})"
                                        for d in budget["curve_deqs"])
        + f", ELBO {point['sde']['bpd']:.4f}, sampling NFE {point.get('sample_nfe')} "
        "(curve subset)", flush=True)
  return point


def elbo_per_image(model, images, draws):
  """Per-image VDM ELBO in bits/dim (sde_bpd), the mean of ``draws`` independent one-time
  Monte Carlo estimates (one estimate alone is too noisy for a per-image difference)."""
  sde = make_sde_fn(model.components.loss_fn, model.eval_settings())
  k = jnp.asarray(images)
  nats = np.mean([sde(model.params, k, jax.random.fold_in(jax.random.PRNGKey(4), j))
                  for j in range(draws)], axis=0)
  return np.asarray(bits_per_dim(-nats, model.components.dim), np.float64)


def _curve_file(workdir):
  return os.path.join(workdir, "curve.json")


def _load_curve(workdir):
  """Curve points already measured in ``workdir`` (a killed run keeps them)."""
  try:
    with open(_curve_file(workdir)) as f:
      return json.load(f)
  except FileNotFoundError:
    return []


def _save_curve(workdir, curve):
  tmp = _curve_file(workdir) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(curve, f)
  os.replace(tmp, _curve_file(workdir))


def train_with_curve(config, workdir, test_images, budget, stops=None):
  """Trains to each step of ``stops`` (default every interval up to
  config.training.num_steps), evaluating the curve subset after each; points measured
  by an earlier, killed run of the same workdir are reused."""
  total = config.training.num_steps
  stops = stops or list(range(budget["interval"], total + 1, budget["interval"]))
  curve = [c for c in _load_curve(workdir) if c["step"] in stops]
  done = {c["step"] for c in curve}
  for stop in stops:
    if stop in done:
      continue
    config.training.num_steps = stop
    run.train(config, workdir)
    curve.append(curve_point(dj.load(workdir), test_images, budget, stop))
    _save_curve(workdir, curve)
  config.training.num_steps = total
  return curve


def evaluate_final(workdir, test_images, k8_images, evals, out=None, per_image=False):
  """Evaluations in ``evals`` missing from ``out`` (a dict, updated and returned); with
  ``per_image`` each keeps its per-image bound and ELBO (for paired differences)."""
  model = dj.load(workdir)
  out = {} if out is None else out
  for deq, k, subset in evals:
    name = _eval_name(deq, k, subset)
    if name in out:
      continue
    images = k8_images if subset == "k8" else test_images
    rows, report = model.per_image(images, jax.random.PRNGKey(2), dequantization=deq,
                                   num_importance=k)
    out[name] = {key: report[key] for key in
                          ("bpd", "bpd_stderr", "sde_bpd", "sde_bpd_stderr", "nfe_mean",
                           "num_images")}
    if per_image:
      out[name]["per_image"] = [r["bpd"] for r in rows]
      out[name]["nfe_per_image"] = [r["nfe"] for r in rows]
      out[name]["sde_per_image"] = elbo_per_image(model, images, 16).tolist()
    print(f"  {deq} K={k}: {report['bpd']:.4f} +- {report['bpd_stderr']:.4f}", flush=True)
  return out


def run_setting(dataset, setting, budget, runs_dir, test_images, k8_images):
  config = make_config(dataset, setting, budget)
  workdir = os.path.join(runs_dir, dataset, _slug(setting))
  start = time.perf_counter()
  if setting in FINETUNE_FROM:
    source = os.path.join(runs_dir, dataset, _slug(FINETUNE_FROM[setting]))
    base_steps = budget["steps"]
    extra = max(budget["steps"] // 10, budget["interval"] // 2)
    config.training.init_from = source
    config.training.num_steps = extra
    config.training.checkpoint_every = extra
    config.training.warmup_steps = 1
    if budget.get("curve_deqs"):
      # The fine-tune's end on the same curve (its steps count from the source's end).
      curve = [dict(c, step=c["step"] + base_steps) for c in train_with_curve(
          config, workdir, fixed_subset(test_images, budget["curve_images"]), budget,
          stops=[extra])]
    else:
      run.train(config, workdir)
      curve = []
    steps = base_steps + extra
  else:
    curve = train_with_curve(config, workdir, fixed_subset(test_images, budget["curve_images"]),
                             budget)
    steps = budget["steps"]
  result = {"steps": steps, "curve": curve, "train_seconds": time.perf_counter() - start,
            "commit": commit()}
  result["eval"] = evaluate_final(workdir, test_images, k8_images, budget["evals"],
                                  per_image=True)
  return result


def add_per_image(dataset, per, budget, suffix, runs_dir, train_images, test_images,
                  k8_images, only=None):
  """Per-image values of the final models' tn and u bounds (with their ELBO and NFE) and of
  the Gaussian mixture, where the cached results lack them: evaluated again on the saved
  runs (same images and keys, so the means do not change) for the paired differences."""
  gmm = per.get("baselines", {}).get("Gaussian mixture (u-deq)")
  if gmm is not None and "per_image" not in gmm:
    gmm["per_image"] = gmm_bits(train_images, test_images)[0].tolist()
    save_dataset(dataset, per, budget, suffix)
  for setting, res in per.items():
    if setting == "baselines" or (only and setting not in only):
      continue
    workdir = os.path.join(runs_dir, dataset, _slug(setting))
    wanted = [e for e in (("tn", 1, "test"), ("u", 1, "test")) if e in budget["evals"]]
    missing = [e for e in wanted if "per_image" not in res["eval"].get(_eval_name(*e), {})]
    if not missing or not os.path.isdir(os.path.join(workdir, "checkpoints")):
      continue
    print(f"{dataset}: per-image values of {setting!r}", flush=True)
    for e in missing:
      res["eval"].pop(_eval_name(*e), None)
    evaluate_final(workdir, test_images, k8_images, missing, res["eval"], per_image=True)
    save_dataset(dataset, per, budget, suffix)


def _json_path(dataset, suffix):
  return os.path.join(RESULTS, f"ablation_{dataset}{suffix}.json")


def load_cached(dataset, budget, suffix):
  """Cached results of one data set, if they were made with this budget and network."""
  path = _json_path(dataset, suffix)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    saved = json.load(f)
  same = (_training_budget(saved.get("budget", {})) == _training_budget(budget)
          and saved.get("network") == network_fields(dataset))
  return saved["results"] if same else {}


def _training_budget(budget):
  """The budget without its list of evaluations: adding one later keeps the cached runs
  (the missing evaluations are then run on the saved checkpoints)."""
  return {k: v for k, v in budget.items() if k != "evals"}


def save_dataset(dataset, per, budget, suffix):
  """Writes ``per`` merged into the cached results (under a lock: the settings of one data
  set may run as several processes; each entry is written whole by the process that ran
  it, so an entry this process has wins and the others are kept). ``per`` gains the
  entries the other processes finished; returns it."""
  os.makedirs(RESULTS, exist_ok=True)
  path = _json_path(dataset, suffix)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    merged = dict(load_cached(dataset, budget, suffix))
    merged.update(per)
    per.update(merged)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"budget": budget, "network": network_fields(dataset), "results": merged},
                f, indent=2)
    os.replace(tmp, path)
  _plot(dataset, merged, os.path.join(RESULTS, f"convergence_{dataset}{suffix}.png"))
  if budget.get("curve_deqs"):
    _plot_paired(dataset, merged, os.path.join(RESULTS, f"tn_minus_u_{dataset}{suffix}.png"))
  return per


def write_table(budgets, suffix):
  """Combined markdown table over every data set with cached results."""
  lines = [("bits/dim +- standard error; every setting of a data set has the same steps, "
            "batch 128, network and seed."), ""]
  rows = [("| data | setting | steps | tn | u | v | sde_bpd | tn K=1, subset | "
           "tn K=8, subset |"), "|---|---|---|---|---|---|---|---|---|"]
  cached = {dataset: load_cached(dataset, budget, suffix) for dataset, budget in budgets.items()}
  for dataset, budget in budgets.items():
    per = cached[dataset]
    if not per:
      continue
    layout = ", ".join(f"{k} {v}" for k, v in network_fields(dataset).items())
    commits = sorted({r["commit"] for n, r in per.items() if n != "baselines" and "commit" in r})
    lines.append(f"- {dataset}: {budget['steps']} steps; {budget['test_images']} test images"
                 + (f", K = 8 on a subset of {budget['k8_images']}"
                    if ("tn", 8, "k8") in budget["evals"] else "")
                 + f"; network: {layout}; code: {', '.join(commits) or 'unknown'}")
    for name, res in per.items():
      if name == "baselines":
        continue
      e = res["eval"]

      def cell(k, e=e):
        return f"{e[k]['bpd']:.3f} +- {e[k]['bpd_stderr']:.3f}" if k in e else "-"

      sde = f"{e['tn_K1']['sde_bpd']:.3f}" if "tn_K1" in e else "-"
      rows.append(f"| {dataset} | {name} | {res['steps']} | {cell('tn_K1')} | "
                  f"{cell('u_K1')} | {cell('v_K1')} | {sde} | {cell('tn_K1_k8set')} | "
                  f"{cell('tn_K8')} |")
    for bname, b in per.get("baselines", {}).items():
      rows.append(f"| {dataset} | baseline: {bname} | | "
                  f"{b['bpd']:.3f} +- {b['bpd_stderr']:.3f} | | | | | |")
  notes = []
  for dataset, budget in budgets.items():
    per = cached[dataset]
    base = per.get("eps, uniform t", {}).get("curve")
    if not base:
      continue
    target = base[-1]["bpd"]
    reached = [f"{name}: " + (f"step {step}" if (step := steps_to_reach(res["curve"], target))
                              else "not within the budget")
               for name, res in per.items()
               if name not in ("baselines", "eps, uniform t") and res.get("curve")]
    notes.append(f"- {dataset}, convergence (tn on the {budget['curve_images']}-image curve "
                 f"subset): the eps baseline ends at {target:.3f} bits/dim after step "
                 f"{base[-1]['step']}; first checkpoint at or below it: "
                 + "; ".join(reached) + ".")
  extra = []
  for dataset, budget in budgets.items():
    if cached[dataset]:
      more = paired_lines(dataset, cached[dataset], budget)
      extra += [""] + more if more else []
  table = "\n".join(lines + [""] + rows + ([""] + notes if notes else []) + extra) + "\n"
  with open(os.path.join(RESULTS, f"ablation{suffix}.md"), "w") as f:
    f.write(table)
  print(table, flush=True)


def paired(a, b):
  """Mean and standard error of the per-image differences a - b (same images)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def _pm(mean_se, digits=3):
  """"+m +- se", with more digits where the standard error would round to 0."""
  while digits < 6 and round(mean_se[1], digits) == 0 and mean_se[1] > 0:
    digits += 1
  return f"{mean_se[0]:+.{digits}f} +- {mean_se[1]:.{digits}f}"


def paired_lines(dataset, per, budget):
  """Markdown of the paired curve (tn - u, ODE - ELBO, NFE per step; budgets with
  ``curve_deqs``) and of the paired comparisons of the final models (where their per-image
  values are kept)."""
  lines = curve_lines(dataset, per, budget) if budget.get("curve_deqs") else []
  finals = final_lines(per, budget)
  if finals:
    lines += ([""] if lines else []) + [f"### {dataset}: final models, paired differences", ""]
    lines += finals
  return lines


def curve_lines(dataset, per, budget):
  """The paired curve table of a budget with ``curve_deqs``."""
  lines = [f"### {dataset}: paired differences (same images, same keys)", "",
           f"Curve on a fixed subset of {budget['curve_images']} test images; differences are "
           "per-image means +- their standard error. `tn - ELBO` is the gap between the "
           "ODE bound (tn) and the VDM ELBO (sde_bpd; per image the mean of 16 one-time "
           "Monte Carlo draws) of the same images; eval NFE is the "
           f"mean of the tn solve, sampling NFE that of {budget.get('sample_images', 0)} "
           "samples.", "",
           "| model | step | tn | u | tn - u | ELBO | tn - ELBO | eval NFE (tn / u) | "
           "sampling NFE |", "|---|---|---|---|---|---|---|---|---|"]
  for name, res in per.items():
    if name == "baselines":
      continue
    for c in res.get("curve", []):
      if "tn" not in c or "u" not in c:
        continue
      tn, u, sde = c["tn"], c["u"], c["sde"]
      lines.append(
          f"| {name} | {c['step']} | {tn['bpd']:.3f} +- {tn['bpd_stderr']:.3f} | "
          f"{u['bpd']:.3f} +- {u['bpd_stderr']:.3f} | "
          f"{_pm(paired(tn['per_image'], u['per_image']))} | {sde['bpd']:.3f} | "
          f"{_pm(paired(tn['per_image'], sde['per_image']))} | "
          f"{tn['nfe_mean']:.0f} / {u['nfe_mean']:.0f} | {c.get('sample_nfe', float('nan')):.0f} |")
  return lines


def final_lines(per, budget):
  """Paired differences between the final models' per-image bounds (same images, keys)."""
  lines = []
  gmm = per.get("baselines", {}).get("Gaussian mixture (u-deq)", {})
  finals = {name: res["eval"] for name, res in per.items()
            if name != "baselines" and "per_image" in res.get("eval", {}).get("tn_K1", {})}

  def bound(name, deq):
    e = finals.get(name, {}).get(f"{deq}_K1")
    return e["per_image"] if e and "per_image" in e else None

  comparisons = [
      ("velocity, IS tn - eps, uniform t tn", ("velocity, IS", "tn"), ("eps, uniform t", "tn")),
      ("velocity, uniform t tn - eps, uniform t tn", ("velocity, uniform t", "tn"),
       ("eps, uniform t", "tn")),
      ("velocity, IS tn - velocity, uniform t tn", ("velocity, IS", "tn"),
       ("velocity, uniform t", "tn")),
      ("SP tn - VP tn (velocity, IS)", ("velocity, IS, SP", "tn"), ("velocity, IS", "tn")),
      ("bin-centre tn - bin-centre u", ("velocity, IS", "tn"), ("velocity, IS", "u")),
      ("bin-centre tn - uniform-trained u", ("velocity, IS", "tn"),
       ("velocity, IS, train u-deq", "u")),
      ("uniform-trained tn - uniform-trained u", ("velocity, IS, train u-deq", "tn"),
       ("velocity, IS, train u-deq", "u")),
      ("2nd-order fine-tune tn - its u", ("velocity, IS + 2nd order", "tn"),
       ("velocity, IS + 2nd order", "u")),
      ("2nd-order fine-tune tn - uniform-trained u", ("velocity, IS + 2nd order", "tn"),
       ("velocity, IS, train u-deq", "u")),
      ("2nd-order tn - 1st-order control tn", ("velocity, IS + 2nd order", "tn"),
       ("velocity, IS + 1st order", "tn")),
  ]
  rows = []
  for label, (na, da), (nb, db) in comparisons:
    a, b = bound(na, da), bound(nb, db)
    if a is not None and b is not None:
      rows.append(f"| {label} | {_pm(paired(a, b))} |")
  for name in finals:
    a = bound(name, "tn")
    if a is not None and "per_image" in gmm:
      rows.append(f"| {name} tn - Gaussian mixture | {_pm(paired(a, gmm['per_image']))} |")
    if a is not None and "sde_per_image" in finals[name]["tn_K1"]:
      rows.append(f"| {name}: tn - ELBO | "
                  f"{_pm(paired(a, finals[name]['tn_K1']['sde_per_image']))} |")
  second, first = finals.get("velocity, IS + 2nd order"), finals.get("velocity, IS + 1st order")
  if second and first and all("sde_per_image" in f["tn_K1"] for f in (second, first)):
    gap = [np.subtract(f["tn_K1"]["per_image"], f["tn_K1"]["sde_per_image"])
           for f in (second, first)]
    rows.append(f"| 2nd-order (tn - ELBO) - 1st-order control (tn - ELBO) | "
                f"{_pm(paired(*gap))} |")
  if second and first:
    # One solve per batch: every image of a batch has its NFE, so only the means compare.
    rows.append(f"| 2nd-order NFE - 1st-order control NFE (mean of the tn solves; "
                f"function evaluations, not bits/dim) | "
                f"{second['tn_K1']['nfe_mean'] - first['tn_K1']['nfe_mean']:+.1f} |")
  if rows:
    lines += [f"Final models on the {budget['test_images']} test images of the table "
              "(paired: the same images and keys; ELBO per image: the mean of 16 Monte "
              "Carlo draws):", "", "| difference | bits/dim |", "|---|---|"] + rows
  return lines


def _plot_paired(dataset, per, path):
  """tn - u, the ODE - ELBO gap and the NFE against training steps, per model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
  for name, res in per.items():
    curve = [c for c in res.get("curve", []) if "tn" in c and "u" in c] if name != "baselines" else []
    if not curve:
      continue
    steps = [c["step"] for c in curve]
    d = [paired(c["tn"]["per_image"], c["u"]["per_image"]) for c in curve]
    axes[0].errorbar(steps, [m for m, _ in d], yerr=[se for _, se in d], marker="o",
                     capsize=2, label=name)
    g = [paired(c["tn"]["per_image"], c["sde"]["per_image"]) for c in curve]
    axes[1].errorbar(steps, [m for m, _ in g], yerr=[se for _, se in g], marker="o",
                     capsize=2, label=name)
    line, = axes[2].plot(steps, [c["tn"]["nfe_mean"] for c in curve], marker="o",
                         label=f"{name}: eval (tn)")
    if all("sample_nfe" in c for c in curve):
      axes[2].plot(steps, [c["sample_nfe"] for c in curve], marker="s", linestyle="--",
                   color=line.get_color(), label=f"{name}: sampling")
  axes[0].axhline(0.0, color="gray", linewidth=1)
  axes[0].set_title(f"{dataset}: tn - u (paired, +- s.e.)")
  axes[1].set_title("ODE bound (tn) - ELBO (paired, +- s.e.)")
  axes[2].set_title("NFE per solve")
  for ax in axes:
    ax.set_xlabel("training step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  axes[0].set_ylabel("bits/dim")
  axes[2].set_ylabel("function evaluations")
  fig.savefig(path, dpi=100)
  plt.close(fig)


def steps_to_reach(curve, target):
  """First recorded step whose bits/dim is at or below ``target`` (None if none is)."""
  return next((c["step"] for c in curve if c["bpd"] <= target), None)


def _plot(dataset, per, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  for name, res in per.items():
    if name == "baselines" or not res.get("curve"):
      continue
    steps = [c["step"] for c in res["curve"]]
    ax.errorbar(steps, [c["bpd"] for c in res["curve"]],
                yerr=[c["bpd_stderr"] for c in res["curve"]], marker="o", capsize=2,
                label=name)
  for bname, b in per.get("baselines", {}).items():
    ax.axhline(b["bpd"], linestyle="--", color="gray", linewidth=1)
    ax.text(0.01, b["bpd"], bname, va="bottom", fontsize=8, color="gray",
            transform=ax.get_yaxis_transform())
  ax.set_title(f"{dataset}: test bits/dim (tn, EMA model) during training")
  ax.set_xlabel("training step")
  ax.set_ylabel("bits/dim")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", choices=list(BUDGETS), default="full",
                      help="quick: minutes; full: about two hours; long: 4x full (digits: the "
                           "best setting; photo_patches: the paired tn vs u study)")
  parser.add_argument("--quick", action="store_true", help="the same as --budget=quick")
  parser.add_argument("--datasets", default=None,
                      help="comma-separated (default: every data set of the budget)")
  parser.add_argument("--settings", default=None,
                      help="semicolon-separated setting names (see the module docstring); "
                           "default: all of them, or only the best one with --budget=long")
  parser.add_argument("--runs_dir", default=None, help="where the training runs go")
  parser.add_argument("--paired", action="store_true",
                      help="add per-image values to cached results that lack them (from the "
                           "saved runs) for the paired differences of the final models")
  parser.add_argument("--wait", action="store_true",
                      help="a fine-tune whose source setting is not finished waits for "
                           "another process to finish it (instead of being skipped)")
  args = parser.parse_args()
  budget_name = "quick" if args.quick else args.budget
  budgets = BUDGETS[budget_name]
  suffix = "" if budget_name == "full" else "_" + budget_name
  datasets = args.datasets.split(",") if args.datasets else list(budgets)
  for dataset in datasets:
    if dataset not in budgets:
      parser.error(f"the {budget_name} budget has no {dataset!r}; it has {list(budgets)}")
  runs_dir = args.runs_dir or os.path.join("runs", "ablation" + suffix)
  chosen = args.settings.split(";") if args.settings else None
  for setting in chosen or []:
    if setting not in SETTINGS:
      parser.error(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")

  for dataset in datasets:
    budget = budgets[dataset]
    cfg = DATASETS[dataset]()
    train_images = data_lib.load_split(cfg.data, "train").images
    test_all = data_lib.load_split(cfg.data, "test").images
    test_images = fixed_subset(test_all, budget["test_images"])
    k8_images = fixed_subset(test_all, budget["k8_images"])
    settings = chosen or (LONG_SETTINGS[dataset] if budget_name == "long" else list(SETTINGS))
    per = load_cached(dataset, budget, suffix)
    if "baselines" not in per:
      print(f"{dataset}: classical baselines", flush=True)
      if budget.get("curve_deqs"):  # per-image values for the paired differences
        bits, components = gmm_bits(train_images, test_images)
        gmm = {"bpd": float(bits.mean()),
               "bpd_stderr": float(bits.std(ddof=1) / np.sqrt(len(bits))),
               "components": components, "per_image": bits.tolist()}
      else:
        gmm = gmm_bpd(train_images, test_images)
      per["baselines"] = {
          "per-pixel categorical": categorical_bpd(train_images, test_images,
                                                   cfg.data.num_levels),
          "Gaussian mixture (u-deq)": gmm,
      }
      save_dataset(dataset, per, budget, suffix)
    for setting in settings:
      if setting in per:
        workdir = os.path.join(runs_dir, dataset, _slug(setting))
        missing = [e for e in budget["evals"] if _eval_name(*e) not in per[setting]["eval"]]
        if missing and os.path.isdir(workdir):
          evaluate_final(workdir, test_images, k8_images, budget["evals"],
                         per[setting]["eval"])
          save_dataset(dataset, per, budget, suffix)
        continue
      if setting in FINETUNE_FROM and FINETUNE_FROM[setting] not in per and args.wait:
        print(f"{dataset}: {setting!r} waits for {FINETUNE_FROM[setting]!r}", flush=True)
        while FINETUNE_FROM[setting] not in per:
          time.sleep(60)
          per.update({k: v for k, v in load_cached(dataset, budget, suffix).items()
                      if k not in per})
      if setting in FINETUNE_FROM and FINETUNE_FROM[setting] not in per:
        print(f"{dataset}: skipping {setting!r}: run {FINETUNE_FROM[setting]!r} first",
              flush=True)
        continue
      print(f"{dataset}: {setting}", flush=True)
      per[setting] = run_setting(dataset, setting, budget, runs_dir, test_images, k8_images)
      save_dataset(dataset, per, budget, suffix)
    if args.paired:
      add_per_image(dataset, per, budget, suffix, runs_dir, train_images, test_images,
                    k8_images, only=chosen)
    save_dataset(dataset, per, budget, suffix)
  write_table(budgets, suffix)


if __name__ == "__main__":
  main()
