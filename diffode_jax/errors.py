"""The errors a user can cause, with one base class.

Every expected failure (bad config, bad data, a missing or incompatible checkpoint, a
solver that did not converge, an unwritable workdir) raises a subclass of
``DiffodeError`` whose message is one line meant for the user; the command line prints it
as ``error: <message>`` and exits with status 1. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class DiffodeError(Exception):
  """Base of every user-facing error of diffode_jax; the message is one line."""


class ConfigError(DiffodeError, ValueError):
  """A config value (or an API argument standing for one) that cannot work."""


class DataError(DiffodeError, ValueError):
  """Bad or missing data: wrong shape, bit depth or values, an empty folder, a tfds failure."""


class CheckpointError(DiffodeError, RuntimeError):
  """A missing, damaged or incompatible checkpoint (or workdir config.json)."""


class WorkdirError(DiffodeError, OSError):
  """A workdir that cannot be used: not a directory, not writable, an unsupported URL."""


class TrainingError(DiffodeError, RuntimeError):
  """Training cannot go on: a non-finite loss or parameters, a batch the devices cannot split."""


class LikelihoodError(DiffodeError, RuntimeError):
  """The evaluation could not produce a valid number (solver failure, bad settings)."""


class SamplingError(DiffodeError, RuntimeError):
  """Sampling could not produce images (solver failure)."""
