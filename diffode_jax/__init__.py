"""diffode_jax: maximum-likelihood training and exact likelihood of diffusion ODEs (i-DODE).

Python API (see ``api.py``):

    import diffode_jax as dj
    model = dj.load(workdir)                       # or dj.load(workdir, step=...)
    bpd, report = model.bpd(images_uint8, key, dequantization="tn", num_importance=1)
    bpd, report = model.bpd(images_uint8, key, settings=dj.EvalSettings(...))
    log_p = model.log_prob(images_uint8, key)      # nats
    samples = model.sample(key, 16)                # uint8

    oracle = dj.oracle(train_images_uint8, config) # closed-form model of a finite set
    mine = dj.from_fn(fn, params, predicts="x0", **dj.path("edm"), num_levels=256,
                      data_range=(-1, 1), image_shape=(32, 32, 3))  # docs/own_model.md

Every user-facing error is a ``dj.DiffodeError``. The command line is ``main.py``
(train / eval_bpd / sample).
"""

from diffode_jax.api import Model, evaluations, from_fn, load, oracle, read_evaluation
from diffode_jax.errors import DiffodeError
from diffode_jax.keys import eval_key
from diffode_jax.likelihood import EvalSettings
from diffode_jax.ode import SolverConfig
from diffode_jax.own_model import path

__all__ = ["DiffodeError", "EvalSettings", "Model", "SolverConfig", "eval_key", "evaluations",
           "from_fn", "load", "oracle", "path", "read_evaluation"]
