"""Command line: train, evaluate bits/dim, or sample a diffusion ODE.

    python main.py --config=configs/digits.py --workdir=runs/digits --mode=train
    python main.py --config=configs/digits.py --workdir=runs/digits --mode=eval_bpd
    python main.py --config=configs/cifar10_velocity.py --workdir=runs/c10_official \
      --mode=import_official --official_checkpoint=PATH/checkpoints-0

Every config field can be overridden, e.g. --config.training.batch_size=64.
Bad input (including an unknown flag or config field) ends with one line on stderr and
exit status 1.

Several processes (multi-host): start one per host with the same flags plus either
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or --distributed
(or DIFFODE_DISTRIBUTED=1) to let jax.distributed.initialize() find them itself on Cloud
TPU, SLURM, Open MPI or Kubernetes.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports: a "
                    "local path or a Cloud Storage prefix, gs://bucket/path.")
flags.DEFINE_enum("mode", "train", ["train", "eval_bpd", "sample", "import_official"],
                  "What to run.")
flags.DEFINE_string("official_checkpoint", None,
                    "--mode=import_official: a released i-DODE checkpoints-0 directory or "
                    "its ckpt-N.flax file (local or gs://).")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with no arguments: the cluster (Cloud "
                  "TPU, SLURM, Open MPI, Kubernetes) is detected from the environment. "
                  "Also on when the environment variable DIFFODE_DISTRIBUTED=1.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0, for a multi-process run started by hand.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl flag parsing that reports any bad flag or config field as one stderr line."""
  try:
    args = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.get("seed")  # a config file that failed to load raises here
  except Exception as e:  # flags.Error, or ml_collections' KeyError / AttributeError / ...
    _fail(_flag_error_message(e))
  return args


def _flag_error_message(e: Exception) -> str:
  text = str(e)
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: a field that is not there
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    field = names[0] if names else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f"unknown config field {field!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
            + "; see configs/default.py for every field")
  return " ".join(text.replace("\\n", " ").split())


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def init_distributed():
  """jax.distributed.initialize from the flags or the environment; no-op for one process."""
  distributed_flags = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  auto = FLAGS.distributed or os.environ.get("DIFFODE_DISTRIBUTED", "") not in ("", "0")
  if not auto and all(v is None for v in distributed_flags):
    return
  import jax

  # Cross-process collectives of the CPU backend (tests, CPU clusters); other backends
  # ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if any(v is None for v in distributed_flags) and not auto:
    _fail("a multi-process run needs all of --coordinator_address, --num_processes and "
          "--process_id (or --distributed)")
  try:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  except (RuntimeError, ValueError) as e:  # no cluster found, coordinator unreachable
    from diffode_jax.errors import first_line
    _fail(f"jax.distributed.initialize failed: {first_line(e)}")


def main(argv):
  del argv
  init_distributed()
  from diffode_jax import cli  # after flag parsing: keeps --help fast

  # The fields set on the command line: a workdir's config.json supplies the rest of
  # what defines its model (and may not be contradicted by them).
  command_line_fields = set(config_flags.get_override_values(FLAGS["config"]))
  status = cli.dispatch(FLAGS.config, FLAGS.workdir, FLAGS.mode, command_line_fields,
                        official_checkpoint=FLAGS.official_checkpoint)
  if status:
    # After a user error, exit at once: orbax / asyncio threads left behind would wait
    # (a failed checkpoint write) or print shutdown tracebacks under the one error line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
