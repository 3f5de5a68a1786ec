"""Bits/dim of one trained workdir's first test images under several solver settings.

    python bench/solver_spot_check.py --workdir=runs/bench_solver/photo_patches_model --images=8

No reference, only the settings side by side (same images, keys and batch): a quick check
of whether a fast setting agrees with tighter ones on a model before the float64 study of
bench/solver_study.py. Prints one line per setting (NFE, mean and per-image bits/dim).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SETTINGS = (("bosh3", 1e-4), ("scipy_rk45", 1e-5), ("dopri5", 1e-5), ("bosh3", 1e-5),
            ("dopri5", 1e-6), ("bosh3", 1e-6), ("dopri5", 1e-7))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--images", type=int, default=8)
  args = parser.parse_args()
  import diffode_jax as dj
  from diffode_jax import data

  model = dj.load(args.workdir)
  images = np.asarray(data.load_split(model.config.data, "test").images[:args.images])
  key = dj.eval_key(model.config)
  for solver, tol in SETTINGS:
    start = time.perf_counter()
    rows, report = model.per_image(images, key, batch_size=len(images), solver=solver,
                                   rtol=tol, atol=tol)
    bpd = np.array([r["bpd"] for r in rows])
    print(f"{solver} {tol:g}: NFE {report['nfe_mean']:.0f} mean {bpd.mean():.4f} per-image "
          f"{np.round(bpd, 3).tolist()} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
