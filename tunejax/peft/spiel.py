"""SpIEL's drop/grow update (Ansell et al. 2024, "Scaling Sparse Fine-Tuning
to Large Language Models"; reference/verified-formulas.md §11): pure
functions over one sparse delta's indices and values, used by the `spiel`
method's host event (`tunejax.peft.sparse`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def drop_fraction(step: int, total: int, *, rate: float, schedule: str,
                  first: bool) -> float:
  """SpIEL's p at reselection `step`: 1 at the first if `first`, then
  linear or cosine decay of `rate` to 0 at `total`."""
  if first:
    return 1.0
  t = min(step / max(total, 1), 1.0)
  if schedule == "cosine":
    return rate * (1 + math.cos(math.pi * t)) / 2
  return rate * (1 - t)


def _spiel_one(idx_K, val_K, score_N, n):
  """One matrix. The n smallest-|value| slots are dropped; the n best
  entries outside the kept set are grown. A dropped entry that is grown
  again keeps its slot, value and moments (as in the paper's code); new
  entries fill the other dropped slots in score order, value 0."""
  k, size = idx_K.shape[0], score_N.shape[0]
  rank = jnp.argsort(jnp.argsort(jnp.abs(val_K), stable=True), stable=True)
  drop = rank < n
  _, cand = jax.lax.top_k(jnp.where(
      jnp.zeros(size, bool).at[idx_K].set(~drop), -jnp.inf, score_N), k)
  grown = jnp.arange(k) < n  # cand is best first
  revived = drop & jnp.zeros(size, bool).at[cand].set(grown)[idx_K]
  fresh = grown & ~jnp.zeros(size, bool).at[idx_K].set(drop)[cand]
  target = drop & ~revived
  order = jnp.argsort(~fresh, stable=True)  # fresh candidates first
  slot_ord = jnp.cumsum(target) - 1
  new_idx = jnp.where(target, cand[order[jnp.maximum(slot_ord, 0)]], idx_K)
  return new_idx.astype(idx_K.dtype), jnp.where(target, 0, val_K), target


@jax.jit
def spiel_update(indices, values, score, n):
  """Drop/grow for one (possibly layer-stacked) matrix. Pure.

  Args:
    indices: int32 [..., k] active flat indices (unique per matrix).
    values: [..., k] their deltas.
    score: [..., in, out] grow score (|accumulated gradient|).
    n: entries to drop and grow per matrix (traced; 0 <= n <= k).

  Returns:
    (indices, values, replaced): the active set is the kept entries plus
    the n entries with the largest score outside the kept set; `replaced`
    marks the slots that now hold a new entry (value 0, moments reset).
  """
  lead = indices.shape[:-1]
  flat = score.reshape(-1, score.shape[-2] * score.shape[-1])
  out = jax.vmap(_spiel_one, in_axes=(0, 0, 0, None))(
      indices.reshape(flat.shape[0], -1), values.reshape(flat.shape[0], -1),
      flat, n)
  return tuple(o.reshape(*lead, -1) for o in out)
