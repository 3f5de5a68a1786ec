"""A TensorBoard event file of scalars, written without TensorFlow."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from typing import Any

from diffode_jax import storage

_WRITERS = itertools.count()


class EventFile:
  """A TensorBoard event file of scalars, written through ``storage.GrowingFile`` (appended
  locally, rewritten whole at each flush in a bucket), so it lands where the workdir is,
  local or gs://, by the same code the rest of the workdir uses.

  The format is tf.summary's: TFRecords (length, masked CRC-32C, data, masked CRC-32C) of
  ``Event`` protos, the first naming the file version, then one scalar per event. The
  protos and the checksum come from the tensorboard package, which needs no TensorFlow.
  """

  def __init__(self, directory: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
    storage.makedirs(directory)
    # Like tf.summary's names; pid and a counter keep two writers of one second apart.
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_WRITERS)}")
    self.path = storage.join(directory, name)
    self.file = storage.GrowingFile(self.path, existing=b"")
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.file.flush()

  def _write(self, event: Any) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self.file.add(header + struct.pack("<I", self._crc(header)) + data +
                  struct.pack("<I", self._crc(data)))

  def scalar(self, tag: str, value: float, step: int) -> None:
    summary = self._summary_pb2.Summary(
        value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    self.file.flush()
