"""Data parallelism over every device of every process: the mesh, batch placement,
replication and barriers.

One 1-D mesh axis ``"data"`` spans ``jax.devices()`` (all processes). A global batch is
split evenly over it; each process holds only its own contiguous slice
(``data.host_batch``) and ``global_batch`` assembles the global array from those slices.
Evaluation places rows of a data set by index instead (``place_rows``): each process
reads only the rows of its own devices. Everything here is a no-op or trivial with one
process and one device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffode_jax.errors import ConfigError

if TYPE_CHECKING:
  from diffode_jax.data.spec import RowSubset

T = TypeVar("T")
PyTree: TypeAlias = Any


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: every device of every process)."""
  return Mesh(np.array(jax.devices() if devices is None else devices), ("data",))


def local_mesh() -> Mesh:
  """A 1-D data-parallel mesh over this process's devices (the Python API's)."""
  return make_mesh(jax.local_devices())


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the mesh's devices."""
  return NamedSharding(mesh, P("data"))


def check_batch(batch_size: int, what: str, num_devices: int | None = None) -> None:
  """Raises ConfigError unless the global batch splits evenly over the devices (default:
  all devices of all processes)."""
  n = jax.device_count() if num_devices is None else num_devices
  if batch_size % n:
    processes = jax.process_count() if num_devices is None else 1
    raise ConfigError(f"{what}={batch_size} is not divisible by the {n} devices "
                      f"({processes} process(es)); each takes an equal share")


def padded_size(rows: int, mesh: Mesh) -> int:
  """rows rounded up to a multiple of the mesh's device count."""
  return -(-rows // mesh.size) * mesh.size


def place_rows(images: np.ndarray | RowSubset, rows: np.ndarray, mesh: Mesh) -> jax.Array:
  """The global batch ``images[rows]`` split over the mesh.

  Each process reads (and sends to its devices) only the rows of its own devices,
  whatever the order of the devices in the mesh.
  """
  rows = np.asarray(rows)
  shape = (len(rows),) + tuple(images.shape[1:])

  def read(index: tuple[slice, ...] | None) -> np.ndarray:
    assert index is not None  # a batch sharding gives every device a slice of the rows
    return np.asarray(images[rows[index[0]]])

  return jax.make_array_from_callback(shape, batch_sharding(mesh), read)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles the global batch array (split over ``"data"``) from this process's slice."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


def replicate(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """Places a pytree whose values are the same on every process with ``sharding``."""

  def place(leaf: Any) -> jax.Array:
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, tree)


def local_copy(tree: PyTree) -> PyTree:
  """A host (NumPy) copy of a pytree of replicated arrays, read from a local device.

  Works for arrays replicated over devices of several processes, whose global value no
  single process can ``device_get``.
  """
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0))
                      if isinstance(a, jax.Array) else np.asarray(a), tree)


def sync(name: str) -> None:
  """A barrier of all processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def broadcast_from_chief(value: int) -> int:
  """Process 0's integer, on every process (a collective; the value itself with one)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def on_any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on at least one (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def chief_first(fn: Callable[[], T], name: str,
                errors: tuple[type[BaseException], ...] = ()) -> T:
  """fn() on every process, process 0 first (e.g. to prepare a tfds data set once).

  An exception of type ``errors`` on process 0 is raised on process 0 after the barrier,
  so the others are not left waiting in it.
  """
  if jax.process_count() == 1:
    return fn()
  error: BaseException | None = None
  result: T | None = None
  if jax.process_index() == 0:
    try:
      result = fn()
    except errors as e:
      error = e
  sync(name)
  if error is not None:
    raise error
  if jax.process_index() != 0:
    result = fn()
  return cast(T, result)  # set by fn() on every process
