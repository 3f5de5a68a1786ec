"""The one path layer: every file diffode_jax reads or writes (workdir files, checkpoint
sources, image folders) goes through here, on a local disk or in a Cloud Storage bucket
(``gs://bucket/path``), with the same calls. Built on ``etils.epath``, which orbax uses
for the checkpoints themselves.

What differs between the two kinds of storage, and how it is hidden:

* **Atomic writes.** Locally ``write_bytes`` writes a temporary file and renames it; a
  Cloud Storage object write is atomic by itself (readers see the old object or the new
  one), so it is written in place.
* **No appends.** Objects cannot be appended (gcsfs' ``open('a')`` silently overwrites),
  so a ``GrowingFile`` (and ``JsonLines``, its JSON rows) appends to a local file but
  keeps the content and rewrites the whole object at each flush on ``gs://``.
* **Directories** do not exist in a bucket: ``makedirs`` is a no-op there and ``isdir``
  means "some object has this prefix".
* **Errors.** Backend errors (gcsfs, google-auth) arrive as ``OSError`` with a readable
  message (``describe``); a bucket that does not exist or cannot be read is found by
  ``check_bucket`` before anything is written.

The ``gs://`` backend is gcsfs (fsspec): importing this module sets ``EPATH_USE_TF=false``
unless the environment says otherwise, so that epath (and orbax, which reads its
checkpoint metadata through epath) use gcsfs rather than ``tf.io.gfile``: gcsfs is the
backend the tests run against a Cloud Storage emulator, and it does not import TensorFlow.
gcsfs' listing cache is off: another process (another host, a resumed run) may have
written the bucket since the last listing.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal, TypeAlias

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

from diffode_jax.errors import QUOTE_LIMIT, first_line  # noqa: E402

# A local path or a gs:// URL, as text or as a path object (pathlib, epath).
StrPath: TypeAlias = str | os.PathLike[str]

REMOTE_PREFIX = "gs://"
_URL_MARK = "://"


def _configure_gcsfs() -> None:
  try:
    import fsspec.config
  except ImportError:  # gcsfs (and fsspec) missing: describe() says what to install
    return
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_configure_gcsfs()


def is_remote(path: StrPath) -> bool:
  """Whether path is in a Cloud Storage bucket (``gs://``)."""
  return os.fspath(path).startswith(REMOTE_PREFIX)


def unsupported(path: StrPath) -> str | None:
  """Why path cannot be used (a URL other than gs://, or a gs:// URL without a bucket),
  or None; the reason does not repeat the path."""
  text = os.fspath(path)
  if is_remote(text):
    return None if bucket_of(text) else "names no bucket (expected gs://<bucket>/<path>)"
  if _URL_MARK in text:
    return ("only local paths and gs:// URLs are supported (a bucket of another cloud can "
            "be mounted, e.g. with s3fs, and used as a local path)")
  return None


def bucket_of(path: StrPath) -> str:
  """The bucket name of a gs:// path ('' for a local path)."""
  text = os.fspath(path)
  if not is_remote(text):
    return ""
  return text[len(REMOTE_PREFIX):].split("/", 1)[0]


def join(path: StrPath, *parts: StrPath) -> str:
  """path/part/...: posix separators for gs://, the local convention otherwise."""
  text = os.fspath(path)
  names = [os.fspath(p) for p in parts]
  return posixpath.join(text, *names) if is_remote(text) else os.path.join(text, *names)


def absolute(path: StrPath) -> str:
  """A local path made absolute, a gs:// path without trailing slashes."""
  text = os.fspath(path)
  if is_remote(text):
    return text.rstrip("/") if len(text.rstrip("/")) > len(REMOTE_PREFIX) else text
  return os.path.abspath(text)


def basename(path: StrPath) -> str:
  text = os.fspath(path).rstrip("/")
  return posixpath.basename(text) if is_remote(text) else os.path.basename(text)


def dirname(path: StrPath) -> str:
  text = os.fspath(path).rstrip("/")
  return posixpath.dirname(text) if is_remote(text) else os.path.dirname(text)


def describe(error: BaseException) -> str:
  """One line saying what went wrong in a storage call."""
  if isinstance(error, ImportError) and "gcsfs" in f"{error.name} {error}":
    return ("gs:// paths need gcsfs (pip install gcsfs; it is a dependency of "
            "diffode_jax)")
  text = getattr(error, "strerror", None) if isinstance(error, OSError) else None
  # Two lines: a cloud client's first line is often only the status code.
  return text[:QUOTE_LIMIT] if text else first_line(error, lines=2)


def _backend_error(error: Exception) -> bool:
  """A failure of the gs:// client stack (anything but a bug of ours)."""
  module = type(error).__module__ or ""
  return module.split(".")[0] in ("gcsfs", "google", "aiohttp", "fsspec", "requests")


class _Translate:
  """Re-raises gs:// client errors (gcsfs' HttpError, google-auth errors, ...) as OSError,
  so callers handle one kind of error for both storages."""

  def __enter__(self) -> _Translate:
    return self

  def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
               tb: TracebackType | None) -> Literal[False]:
    if error is not None and not isinstance(error, OSError) and isinstance(error, Exception) \
        and (_backend_error(error) or isinstance(error, ImportError)):
      raise OSError(describe(error)) from error
    return False


def path(p: StrPath) -> epath.Path:
  return epath.Path(os.fspath(p))


def exists(p: StrPath) -> bool:
  with _Translate():
    return path(p).exists()


def isdir(p: StrPath) -> bool:
  with _Translate():
    return path(p).is_dir()


def isfile(p: StrPath) -> bool:
  with _Translate():
    return path(p).exists() and not path(p).is_dir()


def listdir(p: StrPath) -> list[str]:
  """The names in a directory (FileNotFoundError if there is none)."""
  with _Translate():
    return sorted(child.name for child in path(p).iterdir())


def walk_files(root: StrPath) -> list[str]:
  """Every file under root (recursively) as a sorted list of '/'-separated paths
  relative to root."""
  root_text = os.fspath(root).rstrip("/") or os.fspath(root)
  # gcsfs' walk names directories without the gs:// prefix.
  prefix = root_text[len(REMOTE_PREFIX):] if is_remote(root_text) else root_text
  found: list[str] = []
  with _Translate():
    for dirpath, _, filenames in path(root_text).walk():
      here = os.fspath(dirpath).rstrip("/")
      if is_remote(here):
        here = here[len(REMOTE_PREFIX):]
      rel_dir = here[len(prefix):].lstrip("/") if here.startswith(prefix) else ""
      if not is_remote(root_text):
        rel_dir = rel_dir.replace(os.sep, "/")
      for name in filenames:
        found.append(posixpath.join(rel_dir, name) if rel_dir else name)
  return sorted(found)


def makedirs(p: StrPath) -> None:
  """Creates a local directory and its parents; nothing to do in a bucket."""
  if is_remote(p):
    return
  os.makedirs(os.fspath(p), exist_ok=True)


def read_bytes(p: StrPath) -> bytes:
  with _Translate():
    return path(p).read_bytes()


def read_text(p: StrPath) -> str:
  return read_bytes(p).decode("utf-8")


def write_bytes(p: StrPath, data: bytes) -> None:
  """Replaces p with data atomically: a reader (or a kill) never sees half of it.

  Locally: a temporary file, then a rename. In a bucket an object write is atomic.
  """
  text = os.fspath(p)
  with _Translate():
    if is_remote(text):
      path(text).write_bytes(data)
      return
  tmp = text + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    _replace(tmp, text)
  except BaseException:  # a full disk, a kill signal: leave no half-written temporary
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


_replace = os.replace  # the rename that makes a local write visible (a test seam)


def write_text(p: StrPath, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def remove(p: StrPath) -> None:
  with _Translate():
    path(p).unlink()


def create_exclusive(p: StrPath, data: bytes) -> bool:
  """Creates p holding data unless it exists (then False), atomically: of two callers
  at once exactly one wins. Locally O_CREAT | O_EXCL; in a bucket a conditional upload
  (ifGenerationMatch=0)."""
  text = os.fspath(p)
  if is_remote(text):
    with _Translate():
      import fsspec

      try:
        fsspec.filesystem("gcs").pipe_file(text, data, mode="create")
      except FileExistsError:
        return False
      return True
  try:
    fd = os.open(text, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  return True


def size(p: StrPath) -> int:
  """The size of file p in bytes."""
  if is_remote(p):
    with _Translate():
      return int(path(p).stat().length)
  return os.path.getsize(os.fspath(p))


def mtime(p: StrPath) -> float:
  """When p was last modified (seconds since the epoch; whole seconds in a bucket)."""
  if is_remote(p):
    with _Translate():
      return float(path(p).stat().mtime)
  return os.path.getmtime(os.fspath(p))


def refresh(p: StrPath) -> None:
  """Sets p's modification time to now (in a bucket by rewriting the object)."""
  if is_remote(p):
    write_bytes(p, read_bytes(p))
  else:
    os.utime(os.fspath(p))


def missing_parents(p: StrPath) -> list[str]:
  """The local folders makedirs(p) would create, deepest first ([] in a bucket, which has
  no folders)."""
  if is_remote(p):
    return []
  out: list[str] = []
  current = os.path.abspath(os.fspath(p))
  while not os.path.exists(current):
    out.append(current)
    current = os.path.dirname(current)
  return out


def rmdir(p: StrPath) -> None:
  """Removes an empty local folder (OSError if it is not empty); nothing in a bucket."""
  if not is_remote(p):
    os.rmdir(os.fspath(p))


def rename(source: StrPath, target: StrPath) -> None:
  """Moves a file or a directory (in a bucket: every object under it, copied then deleted,
  so not atomic there)."""
  with _Translate():
    path(source).rename(os.fspath(target))


def touch(p: StrPath) -> None:
  """Creates an empty file (object) at p unless there is one."""
  if exists(p):
    return
  if is_remote(p):
    write_bytes(p, b"")
  else:
    open(os.fspath(p), "a").close()


def directory_problem(p: StrPath) -> str | None:
  """Why p cannot be (or be created as) a writable directory, as the end of a sentence
  beginning with the path ("is not a directory", "is not writable: ..."), or None.
  Changes nothing. In a bucket only an object in the directory's place is a problem (a
  bucket without write permission is found by writing)."""
  if is_remote(p):
    return "is not a directory (it is an object)" if isfile(p) else None
  full = os.path.abspath(os.fspath(p))
  if os.path.exists(full) and not os.path.isdir(full):
    return "is not a directory"
  existing = full
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f"is not writable: {existing!r} is a file"
  if not os.access(existing, os.W_OK | os.X_OK):
    return f"is not writable: {existing!r} is read-only"
  return None


def check_bucket(p: StrPath) -> str | None:
  """For a gs:// path: why its bucket cannot be used (does not exist, no permission,
  unreachable), or None. Reads only (one listing). Local paths: None."""
  if not is_remote(p):
    return None
  bucket = bucket_of(p)
  try:
    with _Translate():
      found = path(REMOTE_PREFIX + bucket).exists()
  except OSError as e:
    reason = describe(e)
    if "forbidden" in reason.lower() or "permission" in reason.lower() or "403" in reason:
      return f"no permission to read bucket {bucket!r} ({reason})"
    return f"cannot reach bucket {bucket!r} ({reason})"
  if not found:
    return f"bucket {bucket!r} does not exist"
  return None


# ----------------------------------------------------------------------------- growing files


class GrowingFile:
  """A file that only grows (a log: metrics.jsonl, eval/per_image.jsonl, TensorBoard
  events). ``add`` queues bytes; ``flush`` makes everything added so far durable.

  Locally the new bytes are appended (a kill can cut the last record: readers drop it).
  In a bucket, where an object cannot be appended (gcsfs' ``open('a')`` silently
  overwrites it), the whole content is kept in memory and the object is rewritten at each
  flush, which is atomic: after a kill the object holds exactly what the last flush had.
  """

  def __init__(self, path_: StrPath, existing: bytes | None = None) -> None:
    """existing: what the file holds now, if the caller knows (a bucket's object is
    otherwise read once here; a local file is never read)."""
    self.path = os.fspath(path_)
    self.remote = is_remote(self.path)
    self._content = b""
    if self.remote:
      if existing is None:
        existing = read_bytes(self.path) if exists(self.path) else b""
      self._content = existing
    self._pending: list[bytes] = []

  def add(self, data: bytes) -> None:
    self._pending.append(data)

  def flush(self) -> None:
    if not self._pending:
      return
    new = b"".join(self._pending)
    if self.remote:
      write_bytes(self.path, self._content + new)
      self._content += new
    else:
      with open(self.path, "ab") as f:
        f.write(new)
    self._pending = []


class JsonLines:
  """A ``GrowingFile`` of JSON rows, one a line: every row once, in order, on both kinds
  of storage."""

  def __init__(self, path_: StrPath, existing_rows: list[Any] | None = None) -> None:
    """existing_rows: the file's rows, if the caller knows them (see GrowingFile)."""
    existing = None
    if is_remote(path_):  # its complete rows only
      rows = read_jsonl(path_) if existing_rows is None else existing_rows
      existing = _lines(rows)
    self.file = GrowingFile(path_, existing)
    self.path = self.file.path

  def add(self, rows: Iterable[Any]) -> None:
    self.file.add(_lines(rows))

  def flush(self) -> None:
    self.file.flush()


def _lines(rows: Iterable[Any]) -> bytes:
  return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def read_jsonl(p: StrPath) -> list[Any]:
  """The complete JSON lines of a file (a line cut by a kill, and anything after, dropped);
  [] if there is no file."""
  if not exists(p):
    return []
  rows: list[Any] = []
  for line in read_text(p).splitlines():
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return rows


def write_jsonl(p: StrPath, rows: Iterable[Any]) -> None:
  """Replaces p with rows, one JSON object a line, atomically."""
  write_bytes(p, _lines(rows))
