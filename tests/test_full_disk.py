"""A full disk during eval_bpd or sample: one line, exit 1, no temporary files left."""

import errno
import os

from diffode_jax import cli, run, storage


REAL_REPLACE = storage._replace


def _no_space_in_eval(source, target):
  """The disk fills up once the evaluation starts writing eval/ (the start-up checks pass)."""
  if os.sep + "eval" + os.sep in os.fspath(target):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return REAL_REPLACE(source, target)


def test_eval_bpd_on_a_full_disk_is_one_line_and_leaves_no_temporaries(tiny_config,
                                                                      tmp_path, capsys,
                                                                      monkeypatch):
  workdir = str(tmp_path / "run")
  run.train(tiny_config, workdir)
  capsys.readouterr()
  monkeypatch.setattr(storage, "_replace", _no_space_in_eval)
  status = cli.dispatch(tiny_config, workdir, "eval_bpd")
  lines = [l for l in capsys.readouterr().err.splitlines()
           if l.strip() and not l.startswith("eval_bpd:")]  # the progress bar
  assert status == 1 and len(lines) == 1, lines
  assert lines[0].startswith("error: cannot write the evaluation to ")
  assert "No space left on device" in lines[0]
  left = [n for _, _, names in os.walk(tmp_path) for n in names if n.endswith(".tmp")]
  assert not left, left
  assert not os.path.exists(os.path.join(workdir, "eval", ".lock"))
  monkeypatch.undo()  # with space again, the rerun finishes
  assert cli.dispatch(tiny_config, workdir, "eval_bpd") == 0


def _no_space_in_samples(source, target):
  if os.sep + "samples" + os.sep in os.fspath(target):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return REAL_REPLACE(source, target)


def test_sample_on_a_full_disk_is_one_line_and_leaves_no_temporaries(tiny_config, tmp_path,
                                                                     capsys, monkeypatch):
  workdir = str(tmp_path / "run")
  run.train(tiny_config, workdir)
  capsys.readouterr()
  monkeypatch.setattr(storage, "_replace", _no_space_in_samples)
  status = cli.dispatch(tiny_config, workdir, "sample")
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert status == 1 and len(lines) == 1, lines
  assert lines[0].startswith("error: cannot write the samples to ")
  assert "No space left on device" in lines[0]
  left = [n for _, _, names in os.walk(tmp_path) for n in names if n.endswith(".tmp")]
  assert not left, left
  monkeypatch.undo()
  assert cli.dispatch(tiny_config, workdir, "sample") == 0
