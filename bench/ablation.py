"""The paper's ablation at small scale, on the embedded digits and photo_patches data.

    python bench/ablation.py            # full run: about two hours on 2 CPU cores
    python bench/ablation.py --quick    # reduced budget, minutes

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

Each final EMA model is evaluated on the test images with `tn`, `u` and `v`
dequantization (K = 1) and the VDM ELBO (`sde_bpd`), and with `tn` at K = 8 and K = 1 on
the same smaller subset (paired).
Test bits/dim (`tn`, on a subset) is also recorded along training to show convergence
speed. Classical baselines on the same splits: bench/baselines.py.

Training resumes from the runs folder and finished results are cached in the JSON, so an
interrupted run continues. Writes bench/results/ablation.json, ablation.md and
convergence.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import diffode_jax as dj  # noqa: E402
from baselines import categorical_bpd, gmm_bpd  # noqa: E402
from configs import digits, photo_patches  # noqa: E402
from diffode_jax import data as data_lib  # noqa: E402
from diffode_jax import run  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DATASETS = {"digits": digits.get_config, "photo_patches": photo_patches.get_config}
SETTINGS = {
    "eps, uniform t": {"model.parameterization": "eps",
                       "training.importance_sampling": False},
    "velocity, uniform t": {"training.importance_sampling": False},
    "velocity, IS": {},
    "velocity, IS, SP": {"model.schedule": "SP"},
    "velocity, IS, train u-deq": {"training.dequantization": "uniform"},
    "velocity, IS + 2nd order": {"model.second_order": True},  # fine-tunes "velocity, IS"
}
FINETUNE_FROM = {"velocity, IS + 2nd order": "velocity, IS"}
# (dequantization, K, image set): K = 8 runs on a subset, so K = 1 is repeated on that
# same subset for a paired comparison.
EVALS = [("tn", 1, "test"), ("u", 1, "test"), ("v", 1, "test"), ("tn", 8, "k8"),
         ("tn", 1, "k8")]


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


def _test_subset(images, n, seed=0):
  idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
  return images[idx]


def train_with_curve(config, workdir, test_images, budget, start_step=0):
  """Trains to config.training.num_steps in chunks, evaluating tn bits/dim after each."""
  curve = []
  total = config.training.num_steps
  for stop in range(start_step + budget["interval"], total + 1, budget["interval"]):
    config.training.num_steps = stop
    run.train(config, workdir)
    model = dj.load(workdir)
    bpd, _ = model.bpd(test_images, jax.random.PRNGKey(1), dequantization="tn")
    curve.append({"step": stop, "bpd": float(bpd.mean()),
                  "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd)))})
    print(f"  step {stop}: tn {curve[-1]['bpd']:.4f} (curve subset)", flush=True)
  config.training.num_steps = total
  return curve


def evaluate_final(workdir, test_images, k8_images, out=None):
  """Evaluations of EVALS missing from ``out`` (a dict, updated and returned)."""
  model = dj.load(workdir)
  out = {} if out is None else out
  for deq, k, subset in EVALS:
    name = _eval_name(deq, k, subset)
    if name in out:
      continue
    images = k8_images if subset == "k8" else test_images
    _, report = model.bpd(images, jax.random.PRNGKey(2), dequantization=deq,
                          num_importance=k)
    out[name] = {key: report[key] for key in
                          ("bpd", "bpd_stderr", "sde_bpd", "sde_bpd_stderr", "nfe_mean",
                           "num_images")}
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
    run.train(config, workdir)
    curve = []
    steps = base_steps + extra
  else:
    curve = train_with_curve(config, workdir, _test_subset(test_images, budget["curve_images"]),
                             budget)
    steps = budget["steps"]
  result = {"steps": steps, "curve": curve, "train_seconds": time.perf_counter() - start}
  result["eval"] = evaluate_final(workdir, test_images, k8_images)
  return result


def write_outputs(results, budget, quick):
  os.makedirs(RESULTS, exist_ok=True)
  suffix = "_quick" if quick else ""
  with open(os.path.join(RESULTS, f"ablation{suffix}.json"), "w") as f:
    json.dump({"budget": budget, "results": results}, f, indent=2)
  lines = [f"Budget per setting: {budget['steps']} steps of batch 128, same network and "
           f"seed; test images: {budget['test_images']} (K = 8 on {budget['k8_images']}). "
           "bits/dim +- standard error.", "",
           "| data | setting | tn | u | v | sde_bpd | tn K=1, subset | tn K=8, subset |",
           "|---|---|---|---|---|---|---|---|"]
  for dataset, per in results.items():
    for name, res in per.items():
      if name == "baselines":
        continue
      e = res["eval"]
      cell = lambda k: f"{e[k]['bpd']:.3f} +- {e[k]['bpd_stderr']:.3f}" if k in e else "-"
      lines.append(f"| {dataset} | {name} | {cell('tn_K1')} | {cell('u_K1')} | "
                   f"{cell('v_K1')} | {e['tn_K1']['sde_bpd']:.3f} | {cell('tn_K1_k8set')} | "
                   f"{cell('tn_K8')} |")
    base = per.get("baselines", {})
    for bname, b in base.items():
      lines.append(f"| {dataset} | baseline: {bname} | {b['bpd']:.3f} +- {b['bpd_stderr']:.3f} "
                   f"| | | | | |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(RESULTS, f"ablation{suffix}.md"), "w") as f:
    f.write(table)
  _plot(results, os.path.join(RESULTS, f"convergence{suffix}.png"))
  print(table)


def _plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
  for ax, (dataset, per) in zip(axes[0], results.items()):
    for name, res in per.items():
      if name == "baselines" or not res.get("curve"):
        continue
      steps = [c["step"] for c in res["curve"]]
      ax.plot(steps, [c["bpd"] for c in res["curve"]], marker="o", label=name)
    for bname, b in per.get("baselines", {}).items():
      ax.axhline(b["bpd"], linestyle="--", color="gray", linewidth=1)
      ax.text(0, b["bpd"], f" {bname}", va="bottom", fontsize=8, color="gray")
    ax.set_title(f"{dataset}: test bits/dim (tn) during training")
    ax.set_xlabel("training step")
    ax.set_ylabel("bits/dim")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="reduced budget (minutes)")
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--settings", default=";".join(SETTINGS),
                      help="semicolon-separated setting names (see the module docstring)")
  parser.add_argument("--runs_dir", default=None, help="where the training runs go")
  args = parser.parse_args()
  budget = ({"steps": 600, "interval": 200, "curve_images": 64, "test_images": 128,
             "k8_images": 32} if args.quick else
            {"steps": 3000, "interval": 500, "curve_images": 128, "test_images": 360,
             "k8_images": 64})
  runs_dir = args.runs_dir or os.path.join("runs", "ablation_quick" if args.quick else "ablation")
  json_path = os.path.join(RESULTS, f"ablation{'_quick' if args.quick else ''}.json")
  results = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      saved = json.load(f)
    if saved.get("budget") == budget:
      results = saved["results"]

  for dataset in args.datasets.split(","):
    cfg = DATASETS[dataset]()
    train_images = data_lib.load_split(cfg.data, "train").images
    test_all = data_lib.load_split(cfg.data, "test").images
    test_images = _test_subset(test_all, budget["test_images"])
    k8_images = _test_subset(test_all, budget["k8_images"])
    per = results.setdefault(dataset, {})
    if "baselines" not in per:
      print(f"{dataset}: classical baselines", flush=True)
      per["baselines"] = {
          "per-pixel categorical": categorical_bpd(train_images, test_images,
                                                   cfg.data.num_levels),
          "Gaussian mixture (u-deq)": gmm_bpd(train_images, test_images),
      }
      write_outputs(results, budget, args.quick)
    for setting in args.settings.split(";"):
      if setting in per:
        workdir = os.path.join(runs_dir, dataset, _slug(setting))
        missing = [e for e in EVALS if _eval_name(*e) not in per[setting]["eval"]]
        if missing and os.path.isdir(workdir):
          evaluate_final(workdir, test_images, k8_images, per[setting]["eval"])
          write_outputs(results, budget, args.quick)
        continue
      print(f"{dataset}: {setting}", flush=True)
      per[setting] = run_setting(dataset, setting, budget, runs_dir, test_images, k8_images)
      write_outputs(results, budget, args.quick)
  write_outputs(results, budget, args.quick)


if __name__ == "__main__":
  main()
