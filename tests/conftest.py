"""Shared test set-up: tiny configs and offline data only."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# One persistent XLA compilation cache per test session (subprocesses inherit it): the
# many tiny training runs compile the same programs, which costs 10-20 s each on 2 cores.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="diffode_jax_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  """configs/digits.py shrunk to a few thousand parameters."""
  from configs import digits

  config = digits.get_config()
  m = config.model
  m.channels = 8
  m.num_blocks = 1
  m.embed_dim = 16
  m.num_groups = 4
  m.dropout = 0.0
  t = config.training
  t.batch_size = 16
  t.num_steps = 3
  t.log_every = 1
  t.checkpoint_every = 2
  t.warmup_steps = 1
  config.eval.batch_size = 16
  config.eval.num_images = 16
  config.eval.rtol = 1e-3
  config.eval.atol = 1e-3
  return config
