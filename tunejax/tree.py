"""Parameter names and regex label trees.

A parameter's name is its '/'-joined path in the nested-dict tree, e.g.
`layers/attn/q/kernel`. Trainability, learning-rate groups, PEFT targets and
sharding fallbacks are all lists of `(regex, label)` rules over these names:
the first rule whose regex `re.fullmatch`es the name wins, every parameter
must be covered, and a rule that matches nothing is an error (it is almost
always a typo).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax

from tunejax import errors
from tunejax.typing import PyTree


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_name(path) -> str:
  """'/'-joined name of a `jax.tree_util` key path."""
  return "/".join(_key_str(k) for k in path)


def is_axes(x) -> bool:
  """Leaf test for trees of logical-axis-name tuples."""
  return isinstance(x, tuple) and all(n is None or isinstance(n, str)
                                      for n in x)


def flatten(tree: PyTree, is_leaf=None) -> dict[str, Any]:
  """{name: leaf} in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_name(p): x for p, x in leaves}


def unflatten(flat: dict[str, Any]) -> dict:
  """Inverse of `flatten` for nested dicts."""
  out: dict = {}
  for name, x in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def map_with_names(fn: Callable[[str, Any], Any], tree: PyTree, *rest):
  """`jax.tree.map` whose function also receives the leaf's name."""
  return jax.tree_util.tree_map_with_path(
      lambda p, *xs: fn(path_name(p), *xs), tree, *rest)


Rules = Sequence[tuple[str, Any]]
_REQUIRED = object()  # sentinel: an uncovered parameter is an error


def match(name: str, rules: Rules, *, default=_REQUIRED) -> Any:
  """Label of the first rule whose regex fullmatches `name`."""
  for pattern, label in rules:
    if re.fullmatch(pattern, name):
      return label
  if default is _REQUIRED:
    raise errors.ConfigError(
        f"parameter '{name}' is matched by no rule in "
        f"{[p for p, _ in rules]}")
  return default


def label_tree(tree: PyTree, rules: Rules, *, what: str = "rules",
               default=_REQUIRED, allow_unused: bool = False) -> PyTree:
  """Tree of labels from first-match regex rules over parameter names.

  Raises `ConfigError` if a parameter is not covered (and no `default`) or,
  unless `allow_unused`, if a rule matches no parameter.
  """
  names = list(flatten(tree))
  if not allow_unused:
    for pattern, _ in rules:
      _compile(pattern, what)
      if not any(re.fullmatch(pattern, n) for n in names):
        raise errors.ConfigError(
            f"{what}: pattern '{pattern}' matches no parameter "
            f"(e.g. {names[:3]})")
  return map_with_names(lambda n, _: match(n, rules, default=default), tree)


def _compile(pattern: str, what: str):
  try:
    return re.compile(pattern)
  except re.error as e:
    raise errors.ConfigError(f"{what}: bad regex '{pattern}': {e}") from None


def select(tree: PyTree, patterns: Iterable[str]) -> dict[str, Any]:
  """{name: leaf} for leaves whose name fullmatches any pattern."""
  pats = [_compile(p, "select") for p in patterns]
  return {n: x for n, x in flatten(tree).items()
          if any(p.fullmatch(n) for p in pats)}


def split(tree: PyTree, is_first: Callable[[str], bool], is_leaf=None
          ) -> tuple[dict, dict]:
  """Split a nested dict into two nested dicts by a predicate on names."""
  flat = flatten(tree, is_leaf)
  a = {n: x for n, x in flat.items() if is_first(n)}
  b = {n: x for n, x in flat.items() if not is_first(n)}
  return unflatten(a), unflatten(b)


def merge(*trees: dict, is_leaf=None) -> dict:
  """Union of nested dicts with disjoint leaves (inverse of `split`)."""
  flat: dict[str, Any] = {}
  for t in trees:
    for n, x in flatten(t, is_leaf).items():
      if n in flat:
        raise ValueError(f"merge: parameter '{n}' appears twice")
      flat[n] = x
  return unflatten(flat)


def nbytes(tree: PyTree) -> int:
  """Total bytes of array leaves (works on ShapeDtypeStructs too)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
