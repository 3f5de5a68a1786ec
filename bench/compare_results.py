"""Are two ablation result files the same numbers? (a restructuring must not change any)

    python bench/compare_results.py OLD.json NEW.json

For every setting in both files (``results``), compares everything but wall times and the
commit, exactly (no tolerance), and prints one line per setting: identical, or the first
fields that differ. Exit status 1 if any setting differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Fields that name the run rather than its numbers.
IGNORED = ("seconds", "wall", "commit")


def numbers(x: Any) -> Any:
  """x without the IGNORED fields, at any depth."""
  if isinstance(x, dict):
    return {k: numbers(v) for k, v in x.items() if not any(s in k for s in IGNORED)}
  if isinstance(x, list):
    return [numbers(v) for v in x]
  return x


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("old")
  parser.add_argument("new")
  args = parser.parse_args()
  with open(args.old, encoding="utf-8") as f:
    old = json.load(f)["results"]
  with open(args.new, encoding="utf-8") as f:
    new = json.load(f)["results"]
  differ = False
  for name in (n for n in new if n in old):
    a, b = numbers(old[name]), numbers(new[name])
    if a == b:
      print(f"{name}: identical")
      continue
    differ = True
    fields = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    print(f"{name}: differs in {', '.join(fields)}")
  only = sorted(set(old) ^ set(new))
  if only:
    print(f"in one file only (not compared): {', '.join(only)}")
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main())
