"""Chunked XLA drivers: loops over (token, vocabulary) tiles of h @ w.

Any backend. Both drivers loop over vocabulary chunks (outer) and token
blocks (inner), so each w chunk is read once per pass, and hold one
`[block_n, block_v]` float32 tile plus `[N, D]` / `[N, k]` per-token state:
memory is O(block_n * block_v + block_v * D + N * D) for any vocabulary.

The vocabulary is never padded (padding w would copy the whole unembedding):
the last vocabulary chunk starts at `V - block_v` instead and masks the
columns an earlier chunk already covered. Tokens are padded (h is small).

Each driver takes `pairs`, a tuple of (h_NxD, w_DxV) whose tiles are computed
together (one pair for token_stats, policy + reference for token_kl), and
`rows`, a tuple of per-token `[N, k]` arrays sliced alongside the tokens.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from tunejax.kernels import _tiles


def default_blocks(dtype=jnp.float32) -> tuple[int, int]:
  """(block_n, block_v) of the chunked path on this backend, for w's dtype.

  CPU (and TPU), bf16 w: an 8 MiB float32 tile, wide in V because XLA:CPU
  rewrites the whole bf16 dw once per vocabulary chunk (it upcasts a bf16
  dynamic-update-slice to float32 around the whole buffer), so fewer chunks
  are much faster. CPU, float32 w (in-place dw updates): an 8 MiB tile with
  4x the rows, which reuses each w chunk over more tokens; value and both
  gradients at N=4096, D=640, V=262144 took 13.0-14.8 s with (1024, 2048)
  vs 15.5 s with (256, 8192) and 17.5-19.7 s for naive logits (2-core
  VM), at 26 MiB of temp memory.
  GPU: every loop iteration launches its kernels, so tiles are 8x larger
  (a 64 MiB float32 tile, still >= 100x below naive logits at that shape):
  measured on an H100, value and both gradients at that shape take 45.8 ms
  with (256, 8192) tiles and 19.8 ms with (4096, 4096).
  """
  if jax.default_backend() in ("gpu", "cuda", "rocm"):
    return 4096, 4096
  if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32:
    return 1024, 2048
  return 256, 8192


def plan(n, v, block_n, block_v):
  """Effective block sizes and chunk counts for N tokens, V columns.

  The vocabulary block shrinks (by < 1/8) to divide V when it can, so no
  chunk overlaps the previous one and the overlap masks vanish statically
  (32000 -> 4 x 8000; 128256 -> 16 x 8016 at block_v 8192). Token blocks
  are balanced (rows padded to a multiple of 8 only): 4100 tokens at
  block_n 1024 make 5 blocks of 824, not 5 of 1024 (20% padding rows,
  each a full pass over the vocabulary).
  """
  block_v = min(block_v, v)
  n_chunks = -(-v // block_v)
  for c in range(n_chunks, n_chunks + n_chunks // 8 + 1):
    if v % c == 0:
      block_v = v // c
      break
  n_blocks = -(-n // block_n)
  block_n = -(-n // n_blocks // 8) * 8
  return block_n, block_v, n_blocks, -(-v // block_v)


def owned(cols, own, v, block_v):
  """Columns a chunk owns (not covered by the previous chunk)."""
  return True if v % block_v == 0 else cols >= own


def chunk_start(j, v, block_v):
  """Start column of chunk j and the first column it owns (overlap trick)."""
  own = j * block_v
  return jnp.minimum(own, v - block_v), own


def _w_chunk(w, v0, block_v, vocab_axis):
  """`block_v` vocabulary entries of w, in w's own layout."""
  return jax.lax.dynamic_slice_in_dim(w, v0, block_v, axis=vocab_axis)


def dv(w_c, vocab_axis):
  """`[D, U]` view of a chunk (for `[V, D]` chunks a transpose that XLA
  folds into the consuming matmul)."""
  return w_c if vocab_axis == 1 else w_c.T


def opaque(ws):
  """Makes loop-carried weights look loop-variant to XLA.

  XLA:CPU cannot dynamic-slice bf16, so it upcasts the sliced operand; if w
  is loop-invariant, that upcast of the *whole* w is hoisted out of the loop
  (a full f32 copy of the unembedding). Behind a barrier the upcast stays
  fused with the slice, at chunk size. Only for non-f32 weights: a barrier
  also makes XLA copy a loop-carried w that is live after the loop (a full
  extra unembedding per loop), which f32 weights do not need.
  """
  if all(w.dtype == jnp.float32 for w in ws):
    return ws
  return jax.lax.optimization_barrier(ws)


def compute_dtype(x):
  """dtype of the tile matmul operands: float32 on CPU, where XLA's bf16
  matmuls run ~1.5x slower than float32 ones (measured 133 vs 208 GFLOP/s
  on [1024, 640] x [640, 8192] tiles); the input dtype elsewhere."""
  return jnp.float32 if jax.default_backend() == "cpu" else x.dtype


def chunks(ws, v0, block_v, vocab_axis):
  return tuple(_w_chunk(w, v0, block_v, vocab_axis).astype(compute_dtype(w))
               for w in ws)


def _padded_h(pairs, n_pad):
  return tuple(_tiles.pad_rows(h, n_pad).astype(compute_dtype(h))
               for h, _ in pairs)


def logits(hs, w_chunks, vocab_axis):
  # Contracts D in place: a transposed view of a [U, D] chunk here was
  # materialised by XLA:CPU (a copy of every chunk).
  dims = (((1,), (1 - vocab_axis,)), ((), ()))
  return tuple(jax.lax.dot_general(h, w_c, dims,
                                   preferred_element_type=jnp.float32)
               for h, w_c in zip(hs, w_chunks))


def _take_rows(tree, t0, rows):
  return jax.tree.map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, t0, rows, axis=0), tree)


def _put_rows(tree, part, t0):
  return jax.tree.map(
      lambda x, p: jax.lax.dynamic_update_slice_in_dim(x, p, t0, axis=0),
      tree, part)


def forward(pairs, rows: Sequence[jax.Array], init: Callable, fold: Callable,
            finish: Callable, *, block_n: int, block_v: int,
            vocab_axis: int = 1):
  """Streams vocabulary chunks (outer loop) over token blocks (inner loop).

  Vocabulary-outer order reads (and, on CPU, upcasts) each w chunk once;
  the per-token running state of all tokens is only `[N, k]`.

  Args:
    pairs: tuple of (h_NxD, w_DxV) (w_VxD with `vocab_axis=0`).
    rows: per-token arrays `[N, k]` (padded rows get -1).
    init: rows -> carry pytree of `[rows, ...]` arrays.
    fold: (carry, z_tiles, cols, col_ok, row_blocks, w_chunks) -> carry, on
      a block (`w_chunks`: each pair's `[D, block_v]` slice of w).
    finish: (carry, rows) -> tuple of `[N, ...]` outputs.
    block_n, block_v: tile sizes.

  Returns:
    finish's outputs, cut to N rows.
  """
  n, v = pairs[0][0].shape[0], pairs[0][1].shape[vocab_axis]
  bn, bv, n_blocks, v_blocks = plan(n, v, block_n, block_v)
  n_pad = n_blocks * bn
  hs = _padded_h(pairs, n_pad)
  rs = tuple(_tiles.pad_rows(r, n_pad, -1) for r in rows)

  def vocab_chunk(j, carry):
    state, ws = carry
    ws = opaque(ws)
    v0, own = chunk_start(j, v, bv)
    w_cs = chunks(ws, v0, bv, vocab_axis)
    cols = _tiles.col_ids((1, bv), v0)

    def token_block(i, state):
      t0 = i * bn
      z = logits(_take_rows(hs, t0, bn), w_cs, vocab_axis)
      part = fold(_take_rows(state, t0, bn), z, cols,
                  owned(cols, own, v, bv),
                  _take_rows(rs, t0, bn),
                  tuple(dv(c, vocab_axis) for c in w_cs))
      return _put_rows(state, part, t0)

    return jax.lax.fori_loop(0, n_blocks, token_block, state), ws

  ws = tuple(w for _, w in pairs)
  state, _ = jax.lax.fori_loop(0, v_blocks, vocab_chunk, (init(n_pad), ws))
  return tuple(o[:n] for o in finish(state, rs))


def backward(pairs, rows: Sequence[jax.Array], grad: Callable, *,
             block_n: int, block_v: int, want_dh: bool = True,
             vocab_axis: int = 1):
  """Recomputes logit tiles and accumulates (dh, dw) of the first pair.

  With `want_dh=False` (the caller has dh already) dh is returned as None
  and the loop does only the dw matmuls, so when dw is unused too the whole
  loop is dead code for XLA.

  Args:
    pairs: tuple of (h_NxD, w_DxV); gradients flow to pairs[0] only.
    rows: per-token arrays `[N, k]`.
    grad: (z_tiles, cols, ok, row_blocks) -> dL/dz tile of pairs[0]
      (float32, 0 outside `ok`, the mask of real token rows).
    block_n, block_v: tile sizes.

  Returns:
    (dh_NxD, dw_DxV) in the dtypes of pairs[0].
  """
  h, w = pairs[0]
  n, v = h.shape[0], w.shape[vocab_axis]
  bn, bv, n_blocks, v_blocks = plan(n, v, block_n, block_v)
  n_pad = n_blocks * bn
  hs = _padded_h(pairs, n_pad)
  rs = tuple(_tiles.pad_rows(r, n_pad, -1) for r in rows)
  row_ids = jnp.arange(n_pad, dtype=jnp.int32)[:, None]

  def vocab_chunk(j, carry):
    dh, dw, ws = carry
    ws = opaque(ws)
    v0, own = chunk_start(j, v, bv)
    w_cs = chunks(ws, v0, bv, vocab_axis)
    cols = _tiles.col_ids((1, bv), v0)

    def token_block(i, inner):
      dh, dw_c = inner
      t0 = i * bn
      h_b = _take_rows(hs, t0, bn)
      z = logits(h_b, w_cs, vocab_axis)
      g = grad(z, cols, _take_rows(row_ids, t0, bn) < n,
               _take_rows(rs, t0, bn))
      # A chunk sums over all tokens, so its dw columns are complete even
      # where it overlaps the previous chunk (rewritten with equal values);
      # dh must count those overlap columns only once.
      if want_dh:
        g_own = jnp.where(owned(cols, own, v, bv), g, 0.0)
        dh_b = _take_rows(dh, t0, bn) + _tiles.matmul_nt(
            g_own, dv(w_cs[0], vocab_axis))
        dh = _put_rows(dh, dh_b, t0)
      return dh, dw_c + _tiles.matmul_tn(h_b[0], g)

    dw_c = jnp.zeros(dv(w_cs[0], vocab_axis).shape, jnp.float32)
    dh, dw_c = jax.lax.fori_loop(0, n_blocks, token_block, (dh, dw_c))
    dw_c = dw_c if vocab_axis == 1 else dw_c.T
    dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), v0,
                                             axis=vocab_axis)
    return dh, dw, ws

  dh0 = jnp.zeros((n_pad, h.shape[1]) if want_dh else (), jnp.float32)
  dw0 = jnp.zeros(w.shape, w.dtype)
  ws = tuple(w for _, w in pairs)
  dh, dw, _ = jax.lax.fori_loop(0, v_blocks, vocab_chunk, (dh0, dw0, ws))
  return (dh[:n].astype(h.dtype) if want_dh else None), dw
