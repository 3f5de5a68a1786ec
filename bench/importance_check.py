"""Is the gain of K-sample importance weighting real, or Hutchinson noise?

    python bench/importance_check.py --workdir=runs/ablation/digits/velocity__IS --images=16

The K-sample bound log (1/K) sum_k exp(b_k) needs unbiased estimates of exp(b_k). A
Hutchinson probe makes b_k unbiased instead, and exp of a noisy estimate is biased upward,
so with a stochastic trace the K > 1 number can overstate the bound. This script evaluates
the same test images with K = 1 and K = 8 (`tn` dequantization), once with a Rademacher
probe and once with the exact trace (D Jacobian-vector products per evaluation: only for
small images), and writes bench/results/importance_check.{json,md}.
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
import provenance  # noqa: E402
from ablation import fixed_subset  # noqa: E402
from diffode_jax import data as data_lib  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained run")
  parser.add_argument("--images", type=int, default=16, help="test images (a fixed subset)")
  parser.add_argument("--k", type=int, default=8, help="importance samples")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "importance_check"))
  args = parser.parse_args()

  model = dj.load(args.workdir)
  test = data_lib.load_split(model.config.data, "test").images
  images = fixed_subset(test, args.images)  # the ablation's subsets use the same rule
  rows = []
  for divergence in ("rademacher", "exact"):
    for k in (1, args.k):
      start = time.perf_counter()
      bpd, report = model.bpd(images, jax.random.PRNGKey(2), dequantization="tn",
                              num_importance=k, divergence=divergence)
      rows.append({"divergence": divergence, "K": k, "bpd": report["bpd"],
                   "bpd_stderr": report["bpd_stderr"], "per_image": np.asarray(bpd).tolist(),
                   "nfe_mean": report["nfe_mean"], "seconds": time.perf_counter() - start})
      print(f"{divergence:>10} K={k}: {report['bpd']:.4f} +- {report['bpd_stderr']:.4f} "
            f"({rows[-1]['seconds']:.0f} s)", flush=True)

  def paired_gain(div):
    one, many = (np.array(r["per_image"]) for r in rows if r["divergence"] == div)
    diff = one - many
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))

  code, network = provenance.commit(), provenance.describe(model.config.model)
  lines = [f"Run `{args.workdir}`, step {model.step} ({network}; code {code}); "
           f"{len(images)} test images (fixed "
           f"subset), `tn`, dopri5 at rtol = atol = {model.config.eval.rtol:g}. bits/dim +- "
           f"standard error; the gain is K = 1 minus K = {args.k} on the same images "
           "(paired).", "",
           f"| trace | K = 1 | K = {args.k} | gain | seconds |", "|---|---|---|---|---|"]
  for div in ("rademacher", "exact"):
    one, many = (r for r in rows if r["divergence"] == div)
    gain, gain_se = paired_gain(div)
    lines.append(f"| {div} | {one['bpd']:.3f} +- {one['bpd_stderr']:.3f} | "
                 f"{many['bpd']:.3f} +- {many['bpd_stderr']:.3f} | {gain:.3f} +- {gain_se:.3f} "
                 f"| {one['seconds'] + many['seconds']:.0f} |")
  table = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"workdir": args.workdir, "step": model.step, "commit": code,
               "network": provenance.network(model.config.model), "rows": rows}, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
