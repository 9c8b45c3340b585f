"""Softmax attention over one key block with a recomputing backward.

`attend` is the training/prefill path of `layers.attention` (one key block,
no probe). It keeps only q, k, v, the output and per-query (max,
normaliser) for the backward, which recomputes the scores as
FlashAttention does: no `[M, S]`-sized residual is stored per layer (under
a layer scan those residuals were the dominant bytes written and
zero-filled every step). With a causal mask, queries are processed in
blocks that read only the keys at or before the block (the masked upper
triangle is never computed: 62% of the score FLOPs at 4 blocks).

Layout: queries of a kv group as one `[R·L, K]` matrix (r-major), so each
contraction is a (b, g)-batched GEMM with a tall M.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# A finite "-inf" keeps fully masked rows (padding queries) NaN-free.
MASK_VALUE = -1e30
_F32 = jnp.float32


class Spec(NamedTuple):
  """Static options of one `attend` call."""
  scale: float
  softcap: float | None
  q_block: int | None  # causal query-block size; None = one block


def scores(q_BxGxMxK, k_BxGxSxK, mask_BxLxS, scale: float,
           softcap: float | None):
  """Masked float32 scores [B, G, M, S] and tanh(s/cap) (None without cap)."""
  s = jnp.einsum("bgmk,bgsk->bgms", q_BxGxMxK, k_BxGxSxK,
                 preferred_element_type=_F32) * scale
  t = None
  if softcap is not None:
    t = jnp.tanh(s / softcap)
    s = t * softcap
  return _where_mask(mask_BxLxS, s, MASK_VALUE), t


def _where_mask(mask_BxLxS, x_BxGxMxS, fill):
  b, g, m, n = x_BxGxMxS.shape
  l = mask_BxLxS.shape[1]
  x = jnp.where(mask_BxLxS[:, None, None], x_BxGxMxS.reshape(
      b, g, m // l, l, n), fill)
  return x.reshape(b, g, m, n)


def _blocks(l: int, s: int, q_block: int | None):
  """(l0, l1, s1): query rows [l0, l1) read keys [0, s1)."""
  if not q_block or l != s or l <= q_block:
    return [(0, l, s)]
  return [(l0, min(l0 + q_block, l), min(l0 + q_block, l))
          for l0 in range(0, l, q_block)]


def _rows(x_BxGxMxK, r: int, l0: int, l1: int):
  """Rows of query positions [l0, l1) of every head in the group."""
  b, g, m, k = x_BxGxMxK.shape
  x = x_BxGxMxK.reshape(b, g, r, m // r, k)[:, :, :, l0:l1]
  return x.reshape(b, g, r * (l1 - l0), k)


def _join(parts, r: int):
  """Inverse of `_rows` over consecutive blocks."""
  b, g = parts[0].shape[:2]
  parts = [p.reshape(b, g, r, -1, p.shape[-1]) for p in parts]
  x = jnp.concatenate(parts, axis=3) if len(parts) > 1 else parts[0]
  return x.reshape(b, g, -1, x.shape[-1])


def _fwd(q, k, v, mask, spec: Spec):
  r = q.shape[2] // mask.shape[1]
  outs, mxs, dens = [], [], []
  for l0, l1, s1 in _blocks(mask.shape[1], k.shape[2], spec.q_block):
    s, _ = scores(_rows(q, r, l0, l1), k[:, :, :s1], mask[:, l0:l1, :s1],
                  spec.scale, spec.softcap)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - mx)
    den = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bgms,bgsk->bgmk", p.astype(q.dtype), v[:, :, :s1],
                   preferred_element_type=_F32) / den
    outs.append(o.astype(q.dtype))
    mxs.append(mx)
    dens.append(den)
  o = _join(outs, r)
  return o, (q, k, v, mask, o, _join(mxs, r), _join(dens, r))


def _bwd(spec: Spec, res, do):
  q, k, v, mask, o, mx, den = res
  r = q.shape[2] // mask.shape[1]
  delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1, keepdims=True)
  dqs, dk, dv = [], jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)
  for l0, l1, s1 in _blocks(mask.shape[1], k.shape[2], spec.q_block):
    qb, dob, kb, mb = (_rows(q, r, l0, l1), _rows(do, r, l0, l1),
                       k[:, :, :s1], mask[:, l0:l1, :s1])
    s, t = scores(qb, kb, mb, spec.scale, spec.softcap)
    p = jnp.exp(s - _rows(mx, r, l0, l1)) / _rows(den, r, l0, l1)
    dv = dv.at[:, :, :s1].add(jnp.einsum(
        "bgms,bgmk->bgsk", p.astype(q.dtype), dob,
        preferred_element_type=_F32))
    dp = jnp.einsum("bgmk,bgsk->bgms", dob, v[:, :, :s1],
                    preferred_element_type=_F32)
    ds = p * (dp - _rows(delta, r, l0, l1))
    if t is not None:  # d(cap·tanh(x/cap))/dx
      ds = ds * (1 - t * t)
    # Masked scores are constants: no gradient (matters for fully masked
    # rows, whose probabilities are uniform rather than 0).
    ds = (_where_mask(mb, ds, 0.0) * spec.scale).astype(q.dtype)
    dqs.append(jnp.einsum("bgms,bgsk->bgmk", ds, kb,
                          preferred_element_type=_F32).astype(q.dtype))
    dk = dk.at[:, :, :s1].add(jnp.einsum("bgms,bgmk->bgsk", ds, qb,
                                         preferred_element_type=_F32))
  return _join(dqs, r), dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, mask, spec: Spec):
  return _fwd(q, k, v, mask, spec)[0]


_attend.defvjp(_fwd, _bwd)


def attend(q_BxGxMxK, k_BxGxSxK, v_BxGxSxK, mask_BxLxS, *, scale: float,
           softcap: float | None = None,
           causal_block: int | None = None) -> jax.Array:
  """softmax(cap(q kᵀ·scale) masked) v -> [B, G, M, K] (M = R·L, r-major).

  `causal_block`: the mask is causal by index (key j > query i is always
  masked), so query blocks of this size skip the keys after them. Masked
  entries get probability exactly 0 and no gradient.
  """
  return _attend(q_BxGxMxK, k_BxGxSxK, v_BxGxSxK, mask_BxLxS,
                 Spec(float(scale), softcap, causal_block))


# XLA:CPU runs a K=64 score GEMM at ~205 GFLOP/s while its float32 output
# stays within a few MiB and at ~53 GFLOP/s at 67 MiB (W1 shapes on a
# 2-core VM): CPU query blocks keep one block's scores under this budget.
_CPU_SCORE_BYTES = 8 << 20


def causal_block(l: int, rows: int = 1) -> int | None:
  """Query-block size for causal self-attention over L tokens: about 8
  blocks (56% of the full score FLOPs), at least 128 rows each.

  On a CPU, `rows` (batch x query heads) sizes the block so one block's
  scores fit `_CPU_SCORE_BYTES` (at most 16 blocks, at least 32 rows):
  at batch 8, 8 heads, L=512 (64 rows, not 128) attention fwd+bwd per
  layer runs 7-10% faster (e.g. 118 -> 106 ms).
  """
  if l < 256:
    return None
  block = max(128, -(-l // 8 // 8) * 8)
  if jax.default_backend() == "cpu":
    fit = _CPU_SCORE_BYTES // (4 * rows * l) // 8 * 8
    block = min(block, max(fit, -(-l // 16 // 8) * 8, 32))
  return block
