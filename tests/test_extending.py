"""The examples of docs/design.md, Extending: every Python block there runs as shown, and
its own assertions (a derivative against automatic differentiation, two forms of one drift
for Gaussian data, eps - eps_hat = k (F* - F), a custom network through the likelihood, a
folder of images as a data set) hold. The registrations they make are undone."""

import os
import re

import pytest

from diffode_jax import parameterization, schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
  text = open(os.path.join(ROOT, "docs", "design.md")).read()
  section = text[text.index("## Extending"):]
  following = section.find("\n## ", 5)
  section = section if following < 0 else section[:following]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_an_example_of_each_kind():
  blocks = _blocks()
  assert len(blocks) == 4
  for needle in ("COEFFICIENT_FNS", "FORMS", "build(config, net=", "image_folder"):
    assert any(needle in b for b in blocks), needle


@pytest.mark.parametrize("index", range(4))
def test_example_runs(index, monkeypatch):
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(schedules, "COEFFICIENT_FNS", dict(schedules.COEFFICIENT_FNS))
  monkeypatch.setattr(parameterization, "FORMS", dict(parameterization.FORMS))
  exec(compile(_blocks()[index], f"docs/design.md example {index}", "exec"), {})


def test_an_example_whose_assertion_fails_is_reported(monkeypatch):
  """The check can fail: a block with a false assertion raises."""
  with pytest.raises(AssertionError):
    exec(compile("assert 1 + 1 == 3", "bad example", "exec"), {})
