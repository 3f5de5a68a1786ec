"""The cost of dj.from_fn: the same digits model through dj.load and through from_fn.

    python bench/from_fn_overhead.py --workdir runs/digits_demo    # a trained digits run
    python bench/from_fn_overhead.py                               # configs/digits.py, untrained
    python bench/from_fn_overhead.py --memory                      # also: grad vs forward memory

The network of the workdir is wrapped as a user would write it (docs/own_model.md): the
velocity network of the VP path as ``predicts="dx_dt"`` with dx/dt = sigma alpha / 2 F in
t = gamma (SP: sigma alpha / sqrt 2 F), the eps network as ``predicts="eps"``, on
``dj.path("idode_vp")`` / ``("idode_sp")``. Both models evaluate the same test images with
the same key and the workdir's eval settings; both are compiled first, then they take
turns for ``--repeats`` rounds and each wall time is the median. Prints per-image NFE
equality, the largest bits/dim difference and the wall-time ratio (the issue's target:
equal NFE, within 5%).

Without --workdir the model is configs/digits.py with its zero-initialized output
convolution perturbed (an untrained but non-trivial field).

Measured on the demo checkpoint (configs/digits.py, 3000 steps; 64 test digits, dopri5 at
1e-5, 3 rounds, 2 CPU cores shared with another job): NFE 271 for every image through
both, wall ratio from_fn / dj.load 0.976, mean bits/dim 1.80658 against 1.80515, largest
per-image difference 1.4e-2 (the drifts agree to float32 roundoff; the solve at 1e-5
amplifies it as much as the reproducibility check's 1e-7 move of the start does); grad
temporaries 101.6 MiB against 13.8 MiB forward for both (docs/own_model.md).

``--memory``: the compiled temporaries of ``log_prob_fn`` (forward solve) and of its
``jax.grad`` with respect to params (diffrax RecursiveCheckpointAdjoint), from XLA's
memory analysis of the jitted functions at this batch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffode_jax as dj  # noqa: E402
from diffode_jax import data  # noqa: E402


def project_model(workdir: str | None) -> dj.Model:
  if workdir:
    return dj.load(workdir)
  from configs import digits
  from diffode_jax.config import finalize_config
  from diffode_jax.model import build

  config = finalize_config(digits.get_config())
  components = build(config)
  params = components.init_params(jax.random.PRNGKey(0))
  out = params["Conv_1"]["kernel"]
  params["Conv_1"]["kernel"] = 0.05 * jax.random.normal(jax.random.PRNGKey(1), out.shape)
  return dj.Model(config, components, params)


def wrapped(model: dj.Model) -> dj.Model:
  """model's network through dj.from_fn, re-expressed as a user would."""
  m, c = model.config.model, model.components
  net_fn = c.net_fn  # type: ignore[union-attr]
  path = dj.path({"VP": "idode_vp", "SP": "idode_sp"}[m.schedule], t_min=m.gamma_min - 1,
                 t_max=m.gamma_max)
  alpha, sigma = path["alpha"], path["sigma"]
  scale = {"VP": 0.5, "SP": 1 / math.sqrt(2)}[m.schedule]

  def fn(params, x, t):
    f = net_fn(params, x, t, None, False)
    if m.parameterization == "eps":
      return f
    return (scale * sigma(t) * alpha(t))[:, None, None, None] * f

  predicts = "eps" if m.parameterization == "eps" else "dx_dt"
  shape = data.image_shape(model.config.data)
  return dj.from_fn(fn, model.params, predicts=predicts, **path,
                    num_levels=model.config.data.num_levels, data_range=(-1, 1),
                    image_shape=shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory", action="store_true")
  args = parser.parse_args()
  direct = project_model(args.workdir)
  mine = wrapped(direct)
  images = data.load_split(direct.config.data, "test").images[:args.images]
  key = jax.random.PRNGKey(0)
  settings = direct.eval_settings()
  batch = min(args.images, direct.config.eval.batch_size)
  runs = {"dj.load": direct, "from_fn": mine}
  rows, walls = {}, {name: [] for name in runs}
  for name, model in runs.items():  # compile
    rows[name], _ = model.per_image(images, key, batch, settings=settings)
  for _ in range(args.repeats):
    for name, model in runs.items():
      start = time.perf_counter()
      model.per_image(images, key, batch, settings=settings)
      walls[name].append(time.perf_counter() - start)
  nfe = {name: [r["nfe"] for r in rows[name]] for name in runs}
  bpd = {name: np.array([r["bpd"] for r in rows[name]]) for name in runs}
  median = {name: statistics.median(walls[name]) for name in runs}
  print(f"images {len(images)}, batch {batch}, settings {settings}")
  for name in runs:
    print(f"{name:8s} bpd {bpd[name].mean():.5f}  NFE mean {np.mean(nfe[name]):.1f}  "
          f"wall median {median[name]:.3f} s over {args.repeats}")
  print(f"NFE equal per image: {nfe['dj.load'] == nfe['from_fn']}; largest bits/dim "
        f"difference {np.abs(bpd['dj.load'] - bpd['from_fn']).max():.2e}; wall ratio "
        f"from_fn / dj.load {median['from_fn'] / median['dj.load']:.3f}")
  if args.memory:
    k = jnp.asarray(images[:batch])
    for name, model in runs.items():
      log_prob = model.log_prob_fn(settings=settings)
      forward = jax.jit(log_prob).lower(model.params, k, key).compile()
      grad = jax.jit(jax.grad(lambda p: log_prob(p, k, key).sum())).lower(model.params)
      grad = grad.compile()
      mem = {n: f.memory_analysis() for n, f in (("forward", forward), ("grad", grad))}
      print(name, {n: f"{m.temp_size_in_bytes / 2**20:.1f} MiB temporaries" if m else "n/a"
                   for n, m in mem.items()})


if __name__ == "__main__":
  main()
