"""Mesh construction and logical-axis sharding rules.

Parameters and activations are annotated with the small vocabulary of
logical axis names below; a rules table (from `config.mesh.rules`) maps each
name to mesh axes of the `('data', 'fsdp', 'tensor')` mesh. A dimension whose
size is not divisible by its mesh axes is replicated instead (e.g. a single
KV head under tensor parallelism), so any model runs on any mesh.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tunejax import errors

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
VOCAB, EMBED, Q_HEADS, KV_HEADS, MLP, LAYERS, NORM, RANK, EXPERTS = (
    "vocab", "embed", "q_heads", "kv_heads", "mlp", "layers", "norm", "rank",
    "experts")
# Activation axes.
ACT_BATCH, ACT_LEN, ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_len", "act_embed", "act_heads", "act_mlp", "act_vocab")

# FSDP over 'fsdp', tensor parallelism over 'tensor', data over both batch
# axes. Override per name with `config.mesh.rules`.
DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    VOCAB: "tensor", EMBED: "fsdp", Q_HEADS: "tensor", KV_HEADS: "tensor",
    MLP: "tensor", LAYERS: None, NORM: None, RANK: None, EXPERTS: None,
    ACT_BATCH: ("data", "fsdp"), ACT_LEN: None, ACT_EMBED: None,
    ACT_HEADS: "tensor", ACT_MLP: "tensor", ACT_VOCAB: "tensor",
}


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (one may be -1 = the rest) to a full mesh shape."""
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise errors.ConfigError("mesh: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise errors.ConfigError(
          f"mesh: {n_devices} devices not divisible by {dict(sizes)}")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise errors.ConfigError(
        f"mesh: axis sizes {dict(zip(MESH_AXES, shape))} need "
        f"{math.prod(shape)} devices, have {n_devices}")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A `('data','fsdp','tensor')` mesh (Auto axis types) over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  fixed = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if -1 not in fixed and math.prod(fixed) < len(devices):
    # An explicit smaller mesh uses the first devices (e.g. 1-device runs).
    devices = devices[:math.prod(fixed)]
  shape = mesh_shape(sizes, len(devices))
  try:
    dev = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def resolve_rules(overrides: Mapping | None = None) -> dict:
  rules = dict(DEFAULT_RULES)
  for k, v in (overrides or {}).items():
    if k not in DEFAULT_RULES:
      raise errors.ConfigError(
          f"mesh.rules: unknown logical axis '{k}' (known: "
          f"{sorted(DEFAULT_RULES)})")
    rules[k] = tuple(v) if isinstance(v, (list, tuple)) else v
  return rules


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: Mapping) -> P:
  """PartitionSpec for a value with logical axis `names` and `shape`.

  Mesh axes of size 1, axes already used by an earlier dimension, and axes
  that do not divide the dimension are dropped, so the result is always a
  valid sharding.
  """
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = [a for a in _as_tuple(rules.get(name) if name else None)
            if mesh.shape[a] > 1 and a not in used]
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1
                else tuple(axes))
  return P(*spec)


_FALLBACK_MIN_ELEMENTS = 1 << 16


def fsdp_fallback(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Adds 'fsdp' on the largest free divisible dim if no rule used it.

  Values whose logical axes map only to absent or indivisible mesh axes
  (e.g. LoRA B's output dim under tensor=1, optimizer moments of such
  values) would otherwise be replicated on every device; big ones are
  spread over 'fsdp' instead. Small values stay replicated.
  """
  n = mesh.shape.get("fsdp", 1)
  flat = [a for e in spec for a in ((e,) if isinstance(e, str) else e or ())]
  if n == 1 or "fsdp" in flat or math.prod(shape) < _FALLBACK_MIN_ELEMENTS:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  free = [i for i, (e, d) in enumerate(zip(entries, shape))
          if e is None and d % n == 0]
  if not free:
    return spec
  entries[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*entries)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Mapping):
  """NamedShardings for a tree of logical names and a matching shape tree."""
  is_names = lambda x: isinstance(x, tuple) and all(
      n is None or isinstance(n, str) for n in x)
  return jax.tree.map(
      lambda names, s: NamedSharding(mesh, fsdp_fallback(
          logical_to_spec(names, s.shape, mesh, rules), s.shape, mesh)),
      axes_tree, shapes_tree, is_leaf=is_names)


def batch_sharding(mesh: Mesh, rules: Mapping, ndim: int = 2) -> NamedSharding:
  """Sharding for `[batch, ...]` data arrays: batch over the data axes."""
  axes = tuple(a for a in _as_tuple(rules.get(ACT_BATCH)) if mesh.shape[a] > 1)
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under the active rules, if any.

  Inside `use_rules(mesh, rules)` this pins the activation's sharding; with
  no active mesh it is the identity (single device, tests, export).
  """
  if _ACTIVE["mesh"] is None:
    return x
  mesh, rules = _ACTIVE["mesh"], _ACTIVE["rules"]
  spec = logical_to_spec(names, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


_ACTIVE: dict = {"mesh": None, "rules": None}


class use_rules:  # pylint: disable=invalid-name
  """Context manager that activates (mesh, rules) for `constrain` at trace."""

  def __init__(self, mesh: Mesh | None, rules: Mapping | None = None):
    self._new = {"mesh": mesh, "rules": resolve_rules(rules) if mesh else None}

  def __enter__(self):
    self._old = dict(_ACTIVE)
    _ACTIVE.update(self._new)
    return self

  def __exit__(self, *exc):
    _ACTIVE.update(self._old)
