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


# How much of another library's error message a one-line DiffodeError quotes.
QUOTE_LIMIT = 200


def first_line(error: BaseException, limit: int = QUOTE_LIMIT, lines: int = 1) -> str:
  """The first non-empty line of an exception's message (the first ``lines`` of them,
  joined by a space), at most ``limit`` characters, for quoting it inside a one-line
  DiffodeError (the type name when the message is empty)."""
  found = [line.strip() for line in str(error).splitlines() if line.strip()]
  return " ".join(found[:lines])[:limit] if found else type(error).__name__


def described(error: BaseException, limit: int = QUOTE_LIMIT) -> str:
  """``TypeName: first line`` of an exception."""
  return f"{type(error).__name__}: {first_line(error, limit)}"


def warn(message: str, prefix: str = "warning: ") -> None:
  """A warning a user should see: printed to stderr as one line (``prefix`` + message),
  and logged, so that it is in the log of a run whose stderr nobody reads. (The command
  line sets absl's verbosity to WARNING, but absl's log goes to stderr only at ERROR.)"""
  import sys

  from absl import logging

  logging.warning("%s", message)
  print(f"{prefix}{message}", file=sys.stderr)
