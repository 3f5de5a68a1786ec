"""The runner: the three loops of the command line, and the only code that writes a workdir
(layout: ``diffode_jax.paths``).

* ``train``    trains or resumes (``run/train.py``), optionally with periodic test bits/dim;
* ``evaluate`` bits/dim of a checkpoint, resumable batch by batch (``run/evaluate.py``);
* ``sample``   images by the reverse ODE (``run/sample.py``);
* ``import_official`` a released i-DODE checkpoint into a workdir (``run/import_official.py``).

The library (everything outside ``run/``) never imports this package.
"""

from diffode_jax.run.evaluate import evaluate
from diffode_jax.run.import_official import import_checkpoint as import_official
from diffode_jax.run.sample import sample
from diffode_jax.run.train import train

__all__ = ["evaluate", "import_official", "sample", "train"]
