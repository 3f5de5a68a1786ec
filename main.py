"""Command line: train, evaluate bits/dim, or sample a diffusion ODE.

    python main.py --config=configs/digits.py --workdir=runs/digits --mode=train
    python main.py --config=configs/digits.py --workdir=runs/digits --mode=eval_bpd

Every config field can be overridden, e.g. --config.training.batch_size=64.
Bad input ends with one line on stderr and exit status 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval_bpd", "sample"], "What to run.")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from diffode_jax import cli  # after flag parsing: keeps --help fast

  sys.exit(cli.dispatch(FLAGS.config, FLAGS.workdir, FLAGS.mode))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
