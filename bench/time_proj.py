"""Does this project's ResNet time projection (Dense with bias, default init) help over the
official one (no bias, zero-initialized)? Digits, same network, steps, batch and seeds.

    python bench/time_proj.py              # 2 layouts x 2 seeds x 1500 steps: ~30 min, 2 CPU cores
    python bench/time_proj.py --steps=300  # a smoke run

Each run trains configs/digits.py with model.time_proj = with_bias | zero_no_bias and
evaluates its EMA model on the test digits: the VDM ELBO (sde_bpd, all 360) and the ODE
bound (tn, K = 1, the first 64). Writes bench/results/time_proj.{json,md}.

GroupNorm follows the time projection. With one channel per group (digits: 32 channels,
32 groups) it subtracts each channel's spatial mean, which removes the per-channel time
shift entirely: that network ignores gamma in both layouts (--num_groups=32 shows the two
give the same numbers). The default here is 8 groups, 4 channels per group, as in the
CIFAR-10 reference (128 channels, 32 groups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import diffode_jax as dj  # noqa: E402
import provenance  # noqa: E402
from configs import digits  # noqa: E402
from diffode_jax import data as data_lib  # noqa: E402
from diffode_jax import run  # noqa: E402

RESULTS = os.path.join(HERE, "results")
LAYOUTS = ("with_bias", "zero_no_bias")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--runs", default=os.path.join(os.path.dirname(HERE), "runs", "time_proj"))
  parser.add_argument("--ode_images", type=int, default=64)
  parser.add_argument("--num_groups", type=int, default=8)
  args = parser.parse_args()

  rows = []
  for seed in range(args.seeds):
    for proj in LAYOUTS:
      config = digits.get_config()
      config.seed = seed
      config.model.time_proj = proj
      config.model.num_groups = args.num_groups
      config.training.num_steps = args.steps
      config.training.checkpoint_every = args.steps
      config.training.tensorboard = False
      workdir = os.path.join(args.runs, f"{proj}_g{args.num_groups}_seed{seed}_{args.steps}")
      last = run.train(config, workdir)
      model = dj.load(workdir)
      test = data_lib.load_split(config.data, "test").images
      key = dj.eval_key(model.config)
      _, report = model.bpd(test[:args.ode_images], key)
      sde_all = float(np.mean(jax.device_get(jax.jit(
          lambda p, k: model.components.loss_fn(p, k, key, False)[1].sde_nats())(
              model.params, test)))) / (np.prod(test.shape[1:]) * np.log(2))
      rows.append({"time_proj": proj, "seed": seed, "steps": args.steps,
                   "num_groups": args.num_groups,
                   "train_loss_bpd": last.get("loss"), "test_sde_bpd": sde_all,
                   "test_tn_bpd": report["bpd"], "test_tn_stderr": report["bpd_stderr"],
                   "ode_images": report["num_images"], "nfe": report["nfe_mean"]})
      print(json.dumps(rows[-1]), flush=True)

  os.makedirs(RESULTS, exist_ok=True)
  name = "time_proj" if args.num_groups == 8 else f"time_proj_g{args.num_groups}"
  code = provenance.commit()
  with open(os.path.join(RESULTS, name + ".json"), "w") as f:
    json.dump({"commit": code, "network": provenance.network(config.model), "rows": rows}, f,
              indent=2)
  lines = [f"Digits (configs/digits.py, model.num_groups = {args.num_groups}), {args.steps} "
           f"steps, EMA model; sde_bpd on the 360 test digits, tn (K = 1, dopri5 1e-5) on "
           f"the first {args.ode_images}; code {code}; "
           f"{provenance.describe(config.model)} (time_proj as in each row).", "",
           "| time_proj | seed | test sde_bpd | test tn bpd | NFE |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['time_proj']} | {r['seed']} | {r['test_sde_bpd']:.4f} | "
                 f"{r['test_tn_bpd']:.4f} +- {r['test_tn_stderr']:.4f} | {r['nfe']:.0f} |")
  for proj in LAYOUTS:
    mine = [r for r in rows if r["time_proj"] == proj]
    lines.append(f"| {proj} | mean | {np.mean([r['test_sde_bpd'] for r in mine]):.4f} | "
                 f"{np.mean([r['test_tn_bpd'] for r in mine]):.4f} | |")
  with open(os.path.join(RESULTS, name + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
