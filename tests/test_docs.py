"""The README and docs/ against the repository: what they name exists, what they show runs.

Every repository path they name exists, every relative link (and its #anchor) resolves,
every ``--config.X`` field exists in configs/default.py, and every ``main.py`` command they
show parses (flags and config file, in a subprocess, without running). Beyond that, four
ways the documentation has contradicted the code before: a config missing from the
README's config table, a command whose workdir names another data set than its config, a
layout shown to train from scratch that the library refuses (one channel per GroupNorm
group), and more than one place stating when SIGTERM saves.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The top-level entries of the repository a document may name as a path.
TOP = ("configs", "bench", "diffode_jax", "tests", "docs", "main.py", "Makefile", "setup.py",
       "LICENSE", "README.md", ".ci")


def documents():
  docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                if f.endswith(".md"))
  extra = [p for p in ("bench/README.md",) if os.path.exists(os.path.join(ROOT, p))]
  return ["README.md", *docs, *extra]


def read(doc: str) -> str:
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    return f.read()


def code_blocks(text: str):
  return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = heading.strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(doc: str) -> set:
  return {slug(h) for h in re.findall(r"^#+ (.*)$", strip_code(read(doc)), flags=re.M)}


def strip_code(text: str) -> str:
  return re.sub(r"```.*?```", "", text, flags=re.S)


def named_paths(text: str):
  """Repository paths a text names: in backticks, links or commands."""
  pattern = r"(?<![\w/.~-])((?:%s)(?:/[\w.\-]+)*/?)" % "|".join(re.escape(t) for t in TOP)
  for match in re.finditer(pattern, text):
    p = match.group(1).rstrip(".")
    if text[match.end():match.end() + 1] in ("<", "*", "{"):
      continue  # a pattern (tests/test_<module>.py, results/*.md), not a path
    if p in TOP or "/" in p:
      yield p


def commands(text: str):
  """The argument lists of every ``main.py`` command in the text's code blocks."""
  for block in code_blocks(text):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split(" #")[0].strip()
      if re.search(r"(^|[\s/])main\.py(\s|$)", line) and "python" in line:
        words = shlex.split(line)
        while "main.py" not in words:  # inside a quoted remote command (gcloud --command=)
          words = shlex.split(next(w for w in words if "main.py" in w).partition("=")[2])
        yield words[words.index("main.py") + 1:]


@functools.lru_cache(maxsize=None)
def default_config():
  sys.path.insert(0, ROOT)
  from configs import default

  return default.get_config()


def all_commands():
  out = []
  for doc in documents():
    out.extend((doc, tuple(args)) for args in commands(read(doc)))
  return out


_PARSE = r"""
import json, sys
sys.argv = ["main.py", *json.loads(sys.argv[1])]
sys.path.insert(0, ".")
import main
main.parse_flags(sys.argv)
c = main.FLAGS.config
print(json.dumps({"mode": main.FLAGS.mode, "channels": c.model.channels,
                  "num_groups": c.model.num_groups, "arch": c.model.arch}))
"""


def parse(args):
  """main.py's own flag parsing of args, in a fresh interpreter (the config flag reads its
  overrides from sys.argv): (returncode, parsed fields or stderr)."""
  proc = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(list(args))], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode:
    return proc.returncode, proc.stderr.strip()
  return 0, json.loads(proc.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def parsed_commands():
  cmds = all_commands()
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda c: parse(c[1]), cmds))
  return list(zip(cmds, results))


def test_the_documents_show_commands():
  # the scans below would pass vacuously if the extraction found nothing
  assert len(all_commands()) >= 10
  assert "README.md" in {doc for doc, _ in all_commands()}


def test_every_named_path_exists():
  missing = []
  for doc in documents():
    for p in named_paths(read(doc)):
      if not os.path.exists(os.path.join(ROOT, p)):
        missing.append(f"{doc}: {p}")
  assert not missing, missing


def test_every_relative_link_resolves():
  bad = []
  for doc in documents():
    for target in re.findall(r"\]\(([^)\s]+)\)", strip_code(read(doc))):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
      if not os.path.exists(os.path.join(ROOT, resolved)):
        bad.append(f"{doc}: {target} (no file)")
      elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
        bad.append(f"{doc}: {target} (no heading #{anchor})")
  assert not bad, bad


def test_every_config_field_shown_exists():
  config, bad = default_config(), []
  for doc in documents():
    for field in set(re.findall(r"--config\.([A-Za-z_][\w.]*[A-Za-z0-9_])", read(doc))):
      node = config
      try:
        for part in field.split("."):
          node = node[part]
      except (KeyError, AttributeError, TypeError):
        bad.append(f"{doc}: --config.{field}")
  assert not bad, bad


def test_every_main_py_command_parses():
  bad = [f"{doc}: main.py {' '.join(args)}: {result}"
         for (doc, args), (rc, result) in parsed_commands() if rc]
  assert not bad, bad


def test_the_readme_config_table_lists_every_config():
  readme = read("README.md")
  rows = set(re.findall(r"^\| `(configs/[\w.]+\.py)` \|", readme, flags=re.M))
  shipped = {f"configs/{f}" for f in os.listdir(os.path.join(ROOT, "configs"))
             if f.endswith(".py") and not f.startswith("_")}
  assert shipped - rows == set(), f"configs missing from the README's table: {shipped - rows}"


# A word in a workdir name that says which data set the run is on.
DATA_WORDS = {"cifar10": ("c10", "cifar"), "imagenet32": ("in32", "imagenet"),
              "digits": ("digits",), "photo_patches": ("photo",)}


def test_a_workdir_never_names_another_data_set_than_its_config():
  bad = []
  for doc, args in all_commands():
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    config, workdir = os.path.basename(flags.get("config", "")), flags.get("workdir", "")
    name = os.path.basename(workdir.rstrip("/")).lower()
    mine = [d for d in DATA_WORDS if config.startswith(d)]
    for data, words in DATA_WORDS.items():
      if mine and data not in mine and any(w in name for w in words):
        bad.append(f"{doc}: {config} with --workdir={workdir}")
  assert not bad, bad


def test_no_command_shows_a_network_that_cannot_see_time():
  from diffode_jax.networks.unet import time_blind_reason

  bad = []
  for (doc, args), (rc, fields) in parsed_commands():
    if rc == 0 and fields["arch"] == "unet":
      reason = time_blind_reason(fields["channels"], fields["num_groups"])
      if reason:
        bad.append(f"{doc}: main.py {' '.join(args)}: {reason}")
  # the advice in prose too: every "--config.model.channels=C" shown with a num_groups
  for doc in documents():
    text = read(doc)
    for c, g in re.findall(r"--config\.model\.channels=(\d+)\s+--config\.model\.num_groups=(\d+)",
                           text):
      reason = time_blind_reason(int(c), int(g))
      if reason:
        bad.append(f"{doc}: channels={c} num_groups={g}: {reason}")
  assert not bad, bad


def test_one_place_says_when_sigterm_saves():
  places = []
  for doc in documents():
    for sentence in re.split(r"(?<=[.;:])\s", strip_code(read(doc)).replace("\n", " ")):
      if "SIGTERM" in sentence and re.search(r"\bstep", sentence) and re.search(
          r"sav|checkpoint", sentence):
        places.append(doc)
  assert len(set(places)) <= 1, f"when SIGTERM saves is stated in several files: {places}"


@pytest.mark.parametrize("text, ok", [
    ("see [a](docs/nowhere.md)", False),
    ("see [a](docs/design.md#schedules)", True),
    ("see [a](docs/design.md#no-such-heading)", False),
])
def test_the_link_check_can_fail(tmp_path, monkeypatch, text, ok):
  monkeypatch.setattr(sys.modules[__name__], "documents", lambda: ["README.md"])
  monkeypatch.setattr(sys.modules[__name__], "read",
                      lambda doc: text if doc == "README.md" else _real_read(doc))
  if ok:
    test_every_relative_link_resolves()
  else:
    with pytest.raises(AssertionError):
      test_every_relative_link_resolves()


_real_read = read


def test_the_checks_catch_the_contradictions(monkeypatch):
  """Each contradiction check fails on a document that has the contradiction."""
  this = sys.modules[__name__]
  docs = {
      "README.md": ("| `configs/digits.py` | x |\n```bash\npython main.py "
                    "--config=configs/cifar10_velocity.py --workdir=runs/in32 --distributed\n"
                    "python main.py --config=configs/default.py --workdir=runs/a --mode=train "
                    "--config.model.channels=32 --config.model.num_groups=32\n```\n"
                    "SIGTERM saves the checkpoint of the current step."),
      "docs/other.md": "With several processes SIGTERM saves up to log_every steps later.",
  }
  monkeypatch.setattr(this, "documents", lambda: list(docs))
  monkeypatch.setattr(this, "read", lambda doc: docs[doc])
  parsed_commands.cache_clear()
  try:
    for check in (test_the_readme_config_table_lists_every_config,
                  test_a_workdir_never_names_another_data_set_than_its_config,
                  test_no_command_shows_a_network_that_cannot_see_time,
                  test_one_place_says_when_sigterm_saves):
      with pytest.raises(AssertionError):
        check()
  finally:
    parsed_commands.cache_clear()
