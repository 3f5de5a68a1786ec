"""Every public function and method of the package has types on all its parameters and its
return value (mypy, run by ``make test``, checks that they are right; this checks that they
are there: mypy's default passes a function with no annotations at all)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "diffode_jax"


def _missing(tree: ast.Module, where: str) -> list[str]:
  out = []

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
        visit(child, prefix + child.name + ".")
      elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if child.name.startswith("_") and child.name not in ("__init__", "__call__"):
          continue
        a = child.args
        params = [p for p in a.posonlyargs + a.args + a.kwonlyargs
                  if p.arg not in ("self", "cls")]
        params += [p for p in (a.vararg, a.kwarg) if p is not None]
        untyped = [p.arg for p in params if p.annotation is None]
        if child.returns is None and child.name != "__init__":
          untyped.append("return")
        if untyped:
          out.append(f"{where}:{child.lineno} {prefix}{child.name}: {untyped}")

  visit(tree, "")
  return out


def test_the_checker_finds_a_missing_annotation():
  tree = ast.parse("def f(x: int, y) -> None: ...\nclass C:\n  def g(self) -> int: ...\n"
                   "  def h(self, z: int): ...\ndef _private(a): ...\n")
  assert _missing(tree, "m") == ["m:1 f: ['y']", "m:4 C.h: ['return']"]


def test_every_public_function_is_typed():
  missing = []
  for path in sorted(PACKAGE.rglob("*.py")):
    missing += _missing(ast.parse(path.read_text()), str(path.relative_to(PACKAGE.parent)))
  assert not missing, "untyped public functions:\n" + "\n".join(missing)
