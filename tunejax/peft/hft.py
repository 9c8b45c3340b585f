"""Half Fine-Tuning (HFT; Hui et al., ACL 2025) and per-layer update scales.

HFT trains the whole model but, per round, freezes a selected half of each
layer's parameters by category (verified-formulas §4, from the paper and a
third-party reimplementation; no official code):
  attention {q, k, v, o}: 2 of 4 frozen, at random per layer;
  FFN {gate, up, down}: 2 of 3 frozen in a random half of the layers and 1
    of 3 in the other half;
  norms {attn_norm, mlp_norm (, post norms)}: half frozen per layer;
  embeddings, LM head and the final norm: always trained.
In general a group of m members freezes ⌈m/2⌉ in a random half of the
layers and ⌊m/2⌋ in the others; biases and q/k norms follow their
projection. The selection is re-drawn every `peft.hft_every` steps (a
round; 0 = one round for the whole run) from `peft.hft_seed`.

Frozen slices get no update: gradients and updates are zeroed and their
optimizer moments are kept as they were (the paper leaves moment handling
open; this is the "frozen leaves get no update" reading).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tunejax import tree
from tunejax.peft.base import Method, register

_PROJ = ("q", "k", "v", "o")


def member(name: str) -> tuple[str, str] | None:
  """(group, member) of a layer param name, None if always trained."""
  if not name.startswith("layers/"):
    return None
  parts = name.split("/")[1:]
  if parts[0] == "attn" and parts[1] in _PROJ:
    return "attn", parts[1]
  if parts[0] == "attn" and parts[1] in ("q_norm", "k_norm"):
    return "attn", parts[1][0]  # a q/k norm follows its projection
  if parts[0] == "mlp":
    return "mlp", parts[1]
  if parts[0].endswith("norm"):
    return "norm", parts[0]
  return None


def groups(names) -> dict[str, tuple[str, ...]]:
  """{group: sorted members} present among `names`."""
  out: dict[str, set] = {}
  for n in names:
    gm = member(n)
    if gm:
      out.setdefault(gm[0], set()).add(gm[1])
  return {g: tuple(sorted(m)) for g, m in sorted(out.items())}


def round_masks(seed: int, rnd, n_layers: int,
                members: dict[str, tuple[str, ...]]) -> dict:
  """{(group, member): bool [n_layers]}, True = trained in round `rnd`.

  `rnd` may be traced (the schedule runs inside the jitted step).
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), rnd)
  out = {}
  for gi, (g, ms) in enumerate(sorted(members.items())):
    k_half, k_pick = jax.random.split(jax.random.fold_in(key, gi))
    m = len(ms)
    layer_rank = jnp.argsort(jax.random.permutation(k_half, n_layers))
    n_freeze = jnp.where(layer_rank < n_layers // 2, (m + 1) // 2, m // 2)
    perms = jax.vmap(lambda k: jax.random.permutation(k, m))(
        jax.random.split(k_pick, n_layers))
    rank = jnp.argsort(perms, axis=-1)  # position of member j per layer
    trained = rank >= n_freeze[:, None]
    for j, mem in enumerate(ms):
      out[(g, mem)] = trained[:, j]
  return out


def update_mask(tree_, seed: int, rnd) -> Any:
  """Bool tree (broadcastable to each leaf) of this round's trained part."""
  flat = tree.flatten(tree_)
  members = groups(flat)
  layer = [x for n, x in flat.items() if member(n)]
  masks = round_masks(seed, rnd, layer[0].shape[0], members) if layer else {}

  def one(name, x):
    gm = member(name)
    if gm is None:
      return jnp.ones((), bool)
    return masks[gm].reshape(-1, *([1] * (x.ndim - 1)))
  return tree.map_with_names(one, tree_)


class HftState(NamedTuple):
  count: jax.Array
  inner: Any


def hft_tx(inner: optax.GradientTransformation, seed: int, every: int
           ) -> optax.GradientTransformation:
  """`inner` with this round's frozen half getting no update."""

  def init(params):
    return HftState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(grads, state, params=None):
    rnd = state.count // every if every > 0 else jnp.int32(0)
    mask = update_mask(grads, seed, rnd)
    keep = lambda m, x: jnp.where(m, x, jnp.zeros_like(x))
    grads = jax.tree.map(keep, mask, grads)
    updates, new = inner.update(grads, state.inner, params)
    updates = jax.tree.map(keep, mask, updates)

    def state_mask(s, m):
      try:  # moments have the param's shape; factored states do not
        return jnp.broadcast_to(m, s.shape)
      except (ValueError, AttributeError):
        return jnp.ones((), bool)
    smask = optax.tree_map_params(
        inner, state_mask, new, mask,
        transform_non_params=lambda _: jnp.ones((), bool))
    new = jax.tree.map(lambda m, n, o: jnp.where(m, n, o), smask, new,
                       state.inner)
    return updates, HftState(state.count + 1, new)

  return optax.GradientTransformation(init, update)


@register("hft")
class Hft(Method):
  """Half Fine-Tuning: full FT with a per-round frozen half."""

  def wrap_tx(self, tx):
    return hft_tx(tx, self.cfg.hft_seed, self.cfg.hft_every)
