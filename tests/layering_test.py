"""Imports go downward only (DESIGN.md "Layering")."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "tunejax")

# Lower rank = lower layer; a module may import its own rank or lower.
RANK = {"errors": 0, "typing": 0, "config": 0, "tree": 1, "host": 1,
        "sharding": 2, "kernels": 3, "models": 4, "tokenizers": 4, "peft": 5,
        "losses": 6, "data": 7, "optim": 8, "state": 8, "checkpoint": 9,
        "train": 10, "plot": 11, "main": 11}


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)
        top = rel.split(os.sep)[0].removesuffix(".py")
        if top != "__init__":
          yield path, top


def _imports(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "tunejax":
        for a in node.names:
          yield a.name
      elif node.module.startswith("tunejax."):
        yield node.module.split(".")[1]
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("tunejax."):
          yield a.name.split(".")[1]


@pytest.mark.parametrize("path,top", sorted(_modules()),
                         ids=lambda x: os.path.relpath(x, ROOT)
                         if isinstance(x, str) and x.startswith("/") else x)
def test_imports_go_downward(path, top):
  assert top in RANK, f"new top-level module '{top}': add it to RANK"
  for imported in _imports(path):
    assert imported in RANK, f"{path}: unknown tunejax module {imported}"
    assert RANK[imported] <= RANK[top], (
        f"{os.path.relpath(path, ROOT)} ({top}) imports {imported}, a "
        "higher layer")
