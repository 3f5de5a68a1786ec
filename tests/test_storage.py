"""The path layer (diffode_jax/storage.py) and the workdir files on both kinds of storage:
a local directory and a gs:// prefix of the session's Cloud Storage emulator
(tests/gcs_emulator.py). Each test body runs on both (the ``storage_root`` fixture).

Also: a gs:// path whose bucket does not exist, or that may not be read, ends in one line
naming it, before anything is trained or written.
"""

import http.server
import io
import json
import os
import threading

import numpy as np
import pytest

import diffode_jax as dj
import gcs_emulator
import procs
import tiny
from diffode_jax import cli, storage
from diffode_jax import data as data_lib
from diffode_jax.errors import CheckpointError, DataError, WorkdirError
from diffode_jax.run import eval_rows, metrics


def test_files_directories_and_atomic_writes(storage_root):
  root = storage_root.root
  f = storage.join(root, "a", "b.txt")
  storage.makedirs(storage.dirname(f))
  storage.write_text(f, "one")
  storage.write_text(f, "two")  # replaced whole; no temporary file is left behind
  assert storage.read_text(f) == "two" and storage.read_bytes(f) == b"two"
  assert storage.exists(f) and storage.isfile(f) and not storage.isdir(f)
  assert storage.isdir(storage.join(root, "a")) and not storage.isfile(storage.join(root, "a"))
  storage.makedirs(storage.join(root, "a", "c"))  # a no-op in a bucket
  storage.write_bytes(storage.join(root, "a", "c", "d.bin"), b"\0\1")
  assert storage.listdir(storage.join(root, "a")) == ["b.txt", "c"]
  assert storage.walk_files(root) == ["a/b.txt", "a/c/d.bin"]
  assert storage.walk_files(root + "/") == ["a/b.txt", "a/c/d.bin"]
  storage.touch(f)  # an existing file is left as it is
  assert storage.read_text(f) == "two"
  storage.remove(f)
  assert not storage.exists(f)
  assert storage.read_jsonl(f) == []
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(f)


def test_path_helpers():
  assert storage.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
  assert storage.absolute("gs://b/run/") == "gs://b/run"
  assert storage.absolute("runs/x") == os.path.abspath("runs/x")
  assert storage.basename("gs://b/run/checkpoints/") == "checkpoints"
  assert storage.dirname("gs://b/run/checkpoints") == "gs://b/run"
  assert storage.bucket_of("gs://b/run") == "b" and storage.bucket_of("/tmp/x") == ""
  assert storage.unsupported("/tmp/x") is None and storage.unsupported("gs://b/x") is None
  assert "names no bucket" in storage.unsupported("gs:///x")
  assert "only local paths and gs://" in storage.unsupported("s3://b/x")


def test_json_lines_keep_every_row_once_in_order(storage_root):
  """Objects cannot be appended (gcsfs' open('a') overwrites): in a bucket JsonLines
  rewrites the whole object at each flush; locally it appends. Both read back the same."""
  path = storage_root / "rows.jsonl"
  lines = storage.JsonLines(path)
  lines.add([{"i": 0}, {"i": 1}])
  assert not storage.exists(path)  # nothing is written before a flush
  lines.flush()
  lines.add([{"i": 2}])
  lines.flush()
  lines.flush()  # nothing new: nothing written twice
  assert storage.read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
  resumed = storage.JsonLines(path)  # a new process continues the same file
  resumed.add([{"i": 3}])
  resumed.flush()
  assert [r["i"] for r in storage.read_jsonl(path)] == [0, 1, 2, 3]
  storage.write_text(path, storage.read_text(path) + '{"i": 4, "cut')  # cut by a kill
  assert [r["i"] for r in storage.read_jsonl(path)] == [0, 1, 2, 3]


def test_metrics_and_tensorboard_rows_once_after_truncation(storage_root):
  workdir = storage_root.root
  writer = metrics.MetricsWriter(workdir)
  for step in range(1, 6):
    writer.write({"step": step, "loss": 1.0 / step})
  writer.close()
  assert [r["step"] for r in storage.read_jsonl(storage_root / "metrics.jsonl")] == [1, 2, 3,
                                                                                        4, 5]
  metrics.truncate_metrics(workdir, 3)  # a run resumed from step 3
  writer = metrics.MetricsWriter(workdir)
  writer.write({"step": 4, "loss": 0.4})
  if storage_root.kind == "gs":  # flushed at most every REMOTE_FLUSH_SECONDS ...
    assert len(storage.read_jsonl(storage_root / "metrics.jsonl")) == 3
  writer.flush()  # ... and always before a checkpoint
  assert [r["step"] for r in storage.read_jsonl(storage_root / "metrics.jsonl")] == [1, 2, 3, 4]
  writer.close()
  scalars = procs.read_scalars(workdir)
  assert scalars["loss"][2] == pytest.approx(0.5) and scalars["loss"][4] == pytest.approx(0.4)


def test_per_image_rows_resume_keeps_whole_batches(storage_root):
  header = {"seed": 0}
  rows = [{"index": i, "bpd": float(i)} for i in range(6)]
  first = eval_rows.PerImageRows(storage_root.root, "e")
  assert first.start(header, 6, 2) == 0
  first.add(rows[:2])
  first.add(rows[2:3])  # a batch cut short by a kill
  resumed = eval_rows.PerImageRows(storage_root.root, "e")
  assert resumed.start(header, 6, 2) == 1 and resumed.rows == rows[:2]
  resumed.add(rows[2:4])
  resumed.add(rows[4:6])
  lines = storage.read_jsonl(storage_root / "eval/e/per_image.jsonl")
  assert lines[0]["header"] == header and lines[1:] == rows


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(storage_root, capsys):
  import subprocess
  import socket

  from diffode_jax.run.lock import WorkdirLock

  path = storage_root / "eval/.lock"
  with WorkdirLock(path, "eval_bpd"):
    assert json.loads(storage.read_text(path))["pid"] == os.getpid()
    with pytest.raises(WorkdirError, match="in use by another eval_bpd"):
      WorkdirLock(path, "eval_bpd").acquire()
  assert not storage.exists(path)
  storage.makedirs(storage.dirname(path))  # (the lock removed the eval/ it had created)
  gone = subprocess.Popen(["true"])
  gone.wait()
  storage.write_text(path, json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                       "mode": "eval_bpd", "since": "earlier"}))
  with WorkdirLock(path, "eval_bpd"):  # its holder is dead: taken over
    assert "stale lock" in capsys.readouterr().err
  assert not storage.exists(path)


def test_damaged_checkpoint_is_moved_aside_and_the_previous_step_restored(storage_root):
  from diffode_jax.checkpoint import Checkpointer

  directory = storage_root / "checkpoints"
  state = lambda v: {"w": np.full((8, 8), v, np.float32), "step": np.asarray(int(v))}
  ckpt = Checkpointer(directory)
  ckpt.save(1, state(1.0))
  ckpt.save(2, state(2.0))
  ckpt.close()
  metadata = [f for f in storage.walk_files(storage.join(directory, "2"))
              if f.rsplit("/", 1)[-1] == "_METADATA"]  # the pytree's metadata
  target = storage.join(directory, "2", metadata[0])
  storage.write_bytes(target, storage.read_bytes(target)[:10])  # cut by a failing disk
  reader = Checkpointer(directory, create=False)  # a reader leaves the directory alone
  restored = reader.restore(state(0.0), fallback=True)
  reader.close()
  assert int(restored["step"]) == 1 and reader.damaged == [2]
  assert "2.damaged" not in storage.listdir(directory)
  owner = Checkpointer(directory, create=False, owner=True)
  restored = owner.restore(state(0.0), fallback=True)
  owner.close()
  assert int(restored["step"]) == 1 and owner.damaged == [2]
  assert "2.damaged" in storage.listdir(directory)
  assert storage.listdir(storage.join(directory, "2.damaged"))  # kept for inspection


def _png_bytes(array) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_image_folder_reads_the_same_images_from_either_storage(storage_root, tmp_path):
  images = np.random.default_rng(0).integers(0, 17, (5, 8, 8), dtype=np.uint8)
  names = ["train/a.png", "train/sub/b.png", "train/c.png", "test/0.png", "test/1.png"]
  reference = tmp_path / "reference"
  for name, image in zip(names, images):
    for path in (str(reference / name), storage_root / f"images/{name}"):
      storage.makedirs(storage.dirname(path))
      storage.write_bytes(path, _png_bytes(image))
  config = tiny.default_data(dataset="image_folder", image_size=8, channels=1,
                             num_levels=17)
  for split, expected in (("train", images[[0, 2, 1]]), ("test", images[3:])):
    config.folder = storage_root / "images"
    loaded = data_lib.load_split(config, split)
    config.folder = str(reference)
    local = data_lib.load_split(config, split)
    np.testing.assert_array_equal(loaded.images[..., 0], expected)
    assert loaded.version == local.version  # names and sizes, wherever they are


def test_tfds_data_dir_is_passed_through(monkeypatch):
  """data.tfds_data_dir=gs://... goes to tfds as it is (tfds reads buckets itself)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  seen = []

  def builder(name, data_dir=None):
    seen.append(data_dir)
    raise RuntimeError("stop here")

  monkeypatch.setattr(tfds, "builder", builder)
  config = tiny.default_data(dataset="cifar10", tfds_data_dir="gs://some-bucket/tfds")
  with pytest.raises(DataError, match="cannot load tfds data set 'cifar10'"):
    data_lib.load_split(config, "train")
  assert seen == ["gs://some-bucket/tfds"]


# ----------------------------------------------------------------------------- bad buckets


class _Forbidden(http.server.BaseHTTPRequestHandler):
  """A Cloud Storage API that refuses everything, as for a caller without permission."""

  def _deny(self):
    body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                 "storage.objects.list access to the bucket"}}).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _deny

  def log_message(self, *args):
    pass


class _ReadOnly(_Forbidden):
  """The emulator for reads (GET is passed on), 403 for every write: a caller that may
  list and read the bucket but not create objects in it."""

  def do_GET(self):
    import urllib.error
    import urllib.request

    try:
      response = urllib.request.urlopen(gcs_emulator.URL + self.path, timeout=10)
    except urllib.error.HTTPError as e:
      response = e
    body = response.read()
    self.send_response(response.status if hasattr(response, "status") else response.code)
    for name in ("Content-Type", "Content-Range", "ETag", "X-Goog-Generation"):
      if response.headers.get(name):
        self.send_header(name, response.headers[name])
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)


def _serve(monkeypatch, handler):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
  return server


@pytest.fixture
def read_only_endpoint(gcs, monkeypatch):
  server = _serve(monkeypatch, _ReadOnly)
  yield
  server.shutdown()
  server.server_close()


@pytest.fixture
def forbidding_endpoint(monkeypatch):
  server = _serve(monkeypatch, _Forbidden)
  yield
  server.shutdown()
  server.server_close()


def _one_line(capsys, status, *fragments):
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("mode", ["train", "eval_bpd", "sample"])
def test_missing_bucket_is_one_line_before_anything_runs(gcs, tiny_config, capsys,
                                                          monkeypatch, tmp_path, mode):
  monkeypatch.chdir(tmp_path)
  workdir = "gs://no-such-bucket/run"
  _one_line(capsys, cli.dispatch(tiny_config, workdir, mode),
            f"workdir {workdir!r}", "bucket 'no-such-bucket' does not exist")
  assert list(tmp_path.iterdir()) == []  # nothing written locally (no 'gs:' folder)


def test_missing_bucket_in_the_api_init_from_and_data(gcs, tiny_config, capsys, tmp_path):
  with pytest.raises(WorkdirError, match="bucket 'no-such-bucket' does not exist"):
    dj.load("gs://no-such-bucket/run")
  tiny_config.training.init_from = "gs://no-such-bucket/run"
  _one_line(capsys, cli.dispatch(tiny_config, str(tmp_path / "run"), "train"),
            "training.init_from='gs://no-such-bucket/run'", "does not exist")
  config = tiny.default_data(dataset="image_folder", folder="gs://no-such-bucket/images",
                             image_size=8, channels=1, num_levels=17)
  with pytest.raises(DataError, match="image folder 'gs://no-such-bucket/images': bucket"):
    data_lib.load_split(config, "train")
  with pytest.raises(CheckpointError, match="no config.json in 'gs://"):
    dj.load(f"gs://{gcs_emulator.BUCKET}/never-trained")


def test_bucket_without_permission_is_one_line(gcs, tiny_config, capsys, tmp_path,
                                               forbidding_endpoint):
  workdir = "gs://private-bucket/run"
  for mode in ("train", "eval_bpd"):
    _one_line(capsys, cli.dispatch(tiny_config, workdir, mode), f"workdir {workdir!r}",
              "no permission to read bucket 'private-bucket'")
  with pytest.raises(WorkdirError, match="no permission"):
    dj.load(workdir)


def test_bucket_without_write_permission_is_one_line_before_training(
    gs_root, tiny_config, capsys, read_only_endpoint):
  workdir = gs_root / "run"
  _one_line(capsys, cli.dispatch(tiny_config, workdir, "train"), f"{workdir!r}",
            "is not writable", "Forbidden")
  assert not storage.exists(workdir)


def test_other_urls_are_refused():
  with pytest.raises(WorkdirError, match="only local paths and gs:// URLs"):
    dj.load("s3://bucket/run")

