"""ConfigDict -> typed frozen dataclasses, with one-line errors.

Each subsystem declares its config section as a frozen dataclass whose
fields all have defaults; `build` checks the section's keys and value types
before library code sees them, so `--config.optim.lrr=1` fails with
"config.optim.lrr: unknown key (did you mean 'lr'?)" instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping, TypeVar

from tunejax import errors

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
  """A plain dict from a ConfigDict / FrozenConfigDict / mapping."""
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def _check_type(key: str, value: Any, tp: Any) -> Any:
  """Coerces `value` to the annotated type `tp` or raises ConfigError."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
    if value is None and type(None) in args:
      return None
    for a in args:
      if a is type(None):
        continue
      try:
        return _check_type(key, value, a)
      except errors.ConfigError:
        continue
    raise errors.ConfigError(f"config.{key}: expected {tp}, got {value!r}")
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise errors.ConfigError(
          f"config.{key}: expected a sequence, got {value!r}")
    if args and args[-1] is not Ellipsis and len(args) == len(value):
      items = [_check_type(f"{key}[{i}]", v, a)
               for i, (v, a) in enumerate(zip(value, args))]
    else:
      inner = args[0] if args else Any
      items = [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    return tuple(items)
  if origin is dict or tp is dict:
    if not isinstance(value, Mapping):
      raise errors.ConfigError(f"config.{key}: expected a dict, got {value!r}")
    return dict(value)
  if origin is typing.Literal:
    if value not in args:
      raise errors.ConfigError(
          f"config.{key}: expected one of {list(args)}, got {value!r}")
    return value
  if tp is float and isinstance(value, (int, float)) and not isinstance(
      value, bool):
    return float(value)
  if tp is int and isinstance(value, bool):
    raise errors.ConfigError(f"config.{key}: expected int, got {value!r}")
  if isinstance(tp, type) and not isinstance(value, tp):
    raise errors.ConfigError(
        f"config.{key}: expected {tp.__name__}, got {value!r}")
  return value


def build(cls: type[T], section: Mapping | None, prefix: str) -> T:
  """Instantiates dataclass `cls` from a config section, strictly.

  Unknown keys and wrong types raise `ConfigError` naming `prefix.key`.
  Nested dataclass fields are built recursively.
  """
  section = to_dict(section or {})
  dot = lambda k: f"{prefix}.{k}" if prefix else k
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in section.items():
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise errors.ConfigError(f"config.{dot(key)}: unknown key{hint}")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      kwargs[key] = build(tp, value, dot(key))
    else:
      kwargs[key] = _check_type(dot(key), value, tp)
  try:
    obj = cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"config.{prefix or '<root>'}: {e}") from None
  if hasattr(obj, "validate"):
    obj.validate()
  return obj


def asdict(obj: Any) -> dict:
  return dataclasses.asdict(obj)
