"""Every evaluation of a workdir is kept under its own name (eval/<name>/), listed in
eval/index.json, resumable on its own, readable through dj.evaluations / dj.read_evaluation;
eval/bpd.json and eval/per_image.jsonl are the latest finished one."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import numpy as np
import pytest

import diffode_jax as dj
import procs
import tiny
from diffode_jax import run
from diffode_jax.errors import DiffodeError

EVALUATE = importlib.import_module("diffode_jax.run.evaluate")  # the module, not run.evaluate


def _config(**fields):
  return tiny.config({"training.num_steps": 4, "training.checkpoint_every": 2,
                      "eval.batch_size": 4, "eval.num_images": 8, "eval.rtol": 1e-3,
                      "eval.atol": 1e-3, **fields})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("evals"))
  run.train(_config(), workdir)
  return workdir


def _read(path):
  with open(path) as f:
    return f.read()


def _evaluate(workdir, **fields):
  config = _config(**{f"eval.{k}": v for k, v in fields.items()})
  return run.evaluate(config, workdir)


def test_evaluations_of_other_settings_never_replace_each_other(trained, tmp_path,
                                                                monkeypatch):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  tn = _evaluate(workdir)
  tn_dir = os.path.join(workdir, "eval", tn["evaluation"])
  tn_files = {f: _read(os.path.join(tn_dir, f)) for f in ("bpd.json", "per_image.jsonl")}
  u = _evaluate(workdir, dequantization="u")
  k2 = _evaluate(workdir, num_importance=2)
  fewer = _evaluate(workdir, num_images=4)
  names = [r["evaluation"] for r in (tn, u, k2, fewer)]
  assert len(set(names)) == 4
  assert names[0].startswith("test-step4-tn-K1-n8-") and names[1].startswith("test-step4-u-K1")
  # The tn evaluation is untouched by the three after it.
  assert {f: _read(os.path.join(tn_dir, f)) for f in tn_files} == tn_files
  index = dj.evaluations(workdir)
  assert index["latest"] == names[3] and set(index["evaluations"]) == set(names)
  for name, report in zip(names, (tn, u, k2, fewer)):
    entry = index["evaluations"][name]
    assert entry["finished"] and entry["bpd"] == report["bpd"]
    assert entry["num_images"] == report["num_images"]
    assert entry["dequantization"] == report["dequantization"]
  # The top-level files are the latest finished evaluation's.
  assert json.loads(_read(os.path.join(workdir, "eval", "bpd.json")))["evaluation"] == names[3]
  # Going back to tn computes nothing, and makes it the latest again.
  computed = procs.count_evaluated_batches(monkeypatch)
  again = _evaluate(workdir)
  assert computed == [] and again["bpd"] == tn["bpd"]
  assert dj.evaluations(workdir)["latest"] == names[0]
  report, rows = dj.read_evaluation(workdir, names[1])
  assert report["bpd"] == u["bpd"] and report["dequantization"] == "u"
  assert report["bpd"] == pytest.approx(np.mean([r["bpd"] for r in rows]), rel=1e-12)
  latest, _ = dj.read_evaluation(workdir)
  assert latest["evaluation"] == names[0]


def test_an_unfinished_evaluation_is_listed_but_not_the_latest(trained, tmp_path,
                                                               monkeypatch):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  tn = _evaluate(workdir)
  before = _read(os.path.join(workdir, "eval", "bpd.json"))

  # A u evaluation killed after its first batch.
  real = EVALUATE.evaluate_batches

  def killed(*args, **kwargs):
    for i, rows in enumerate(real(*args, **kwargs)):
      yield rows
      if i == 0:
        raise KeyboardInterrupt

  monkeypatch.setattr(EVALUATE, "evaluate_batches", killed)
  with pytest.raises(KeyboardInterrupt):
    _evaluate(workdir, dequantization="u")
  index = dj.evaluations(workdir)
  unfinished = [n for n, e in index["evaluations"].items() if not e["finished"]]
  assert len(unfinished) == 1 and index["latest"] == tn["evaluation"]
  assert _read(os.path.join(workdir, "eval", "bpd.json")) == before
  with pytest.raises(DiffodeError, match="no finished evaluation"):
    dj.read_evaluation(workdir, unfinished[0])
  # Rerun: the finished batch is kept, the rest computed, and it becomes the latest.
  monkeypatch.setattr(EVALUATE, "evaluate_batches", real)
  computed = procs.count_evaluated_batches(monkeypatch)
  u = _evaluate(workdir, dequantization="u")
  assert computed == [4] and u["evaluation"] == unfinished[0]
  assert dj.evaluations(workdir)["latest"] == unfinished[0]


def test_an_evaluation_written_before_names_is_kept_under_its_name(trained, tmp_path):
  """A workdir from before eval/index.json: its one eval/per_image.jsonl and bpd.json are
  moved under their name when the next evaluation starts, not overwritten."""
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  tn = _evaluate(workdir)
  eval_dir = os.path.join(workdir, "eval")
  rows = _read(os.path.join(eval_dir, "per_image.jsonl"))
  for name in os.listdir(eval_dir):  # back to the old layout: two files only
    path = os.path.join(eval_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif name == "index.json":
      os.remove(path)
  _evaluate(workdir, dequantization="u")
  index = dj.evaluations(workdir)
  old = index["evaluations"][tn["evaluation"]]
  assert old["finished"] and old["bpd"] == tn["bpd"]
  assert _read(os.path.join(eval_dir, tn["evaluation"], "per_image.jsonl")) == rows
  assert dj.read_evaluation(workdir, tn["evaluation"])[0]["bpd"] == tn["bpd"]


def test_a_workdir_without_evaluations(trained):
  assert dj.evaluations(trained) == {"latest": None, "evaluations": {}}
  with pytest.raises(DiffodeError):
    dj.read_evaluation(trained, "test-step4-nothing")
