"""A scalar token loss whose gradient is formed in the forward pass.

`token_loss(h, w, targets, per_token, rows)` is Σ_n per_token(stats_n,
rows_n): any per-token function of the token statistics (logp, lse,
entropy, smooth, as in `token_stats`) and of per-token inputs `rows`
(weights, advantages, old log-probs, ...). Because the loss is fixed before
the backward pass, the op differentiates `per_token` inside each token
block (a tiny vjp on [T] vectors) and computes (dh, dw) while it still
holds the block's logits: three matmul passes over the unembedding
(logits, dh = g w^T, dw = h^T g) instead of the four of `token_stats`
(logits and moments forward, logits again and dw backward). Cotangents
that only exist after the forward pass (a DPO margin across sequences, a
loss normalised by a statistic of the whole batch) need `token_stats`.

The price is memory, paid only when the gradient is taken:
  - a block of `block_n` tokens keeps its scaled logits for the whole
    vocabulary, `[block_n, V]` float32 (default: at most `ROW_BUDGET`);
  - dw is summed over token blocks in float32 and held from the forward to
    the backward pass (for bf16 w, one float32 copy of the unembedding
    while it is summed). With a frozen unembedding (LoRA) XLA drops the dw
    sums: two passes (logits, dh), as with `token_stats`.

Without differentiation (eval) the loss costs `token_stats`' single pass.
`cross_entropy_terms(ε, z)` is the SFT cross-entropy
  wt_n · (-(1 - ε)·logp_n - ε·smooth_n + z·lse_n²)     (rows = wt).
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from tunejax.kernels import _tiles
from tunejax.kernels import _xla
from tunejax.kernels.token_stats import TokenStats, token_stats

# Default cap on one block's `[block_n, V]` float32 logits.
ROW_BUDGET = 128 << 20

# per_token(stats: TokenStats of [T] arrays, rows: pytree of [T, ...]) -> [T]
PerToken = Callable[[TokenStats, object], jax.Array]


class Static(NamedTuple):
  """The per-token loss and the op's (hashable) options."""
  per_token: PerToken
  scaling: _tiles.Scaling
  vocab_axis: int
  block_n: int
  block_v: int
  dtype: str  # of h and w


def _xent(label_smoothing, z_loss, st: TokenStats, wt):
  eps = label_smoothing
  return wt * (-(1.0 - eps) * st.logp - eps * st.smooth + z_loss * st.lse**2)


def cross_entropy_terms(label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> PerToken:
  """per_token of the weighted SFT cross-entropy (rows = weights [N])."""
  return functools.partial(_xent, float(label_smoothing), float(z_loss))


def token_loss(h_NxD, w, targets_N, per_token: PerToken, rows, *,
               softcap=None, temperature=1.0, ignore_index=-1,
               vocab_axis: int = 1, block_n=None, block_v=None):
  """Σ_n per_token(stats_n, rows_n) in three matmul passes, and the stats.

  Args:
    h_NxD: final hidden states.
    w: unembedding `[D, V]` (or `[V, D]` with `vocab_axis=0`).
    targets_N: target ids; `ignore_index` and negative ids are ignored
      (their logp is 0, as in `token_stats`).
    per_token: (TokenStats of [T] float32 arrays, rows sliced to [T, ...])
      -> [T] losses; elementwise over tokens, traced once per token block.
    rows: pytree of float `[N, ...]` per-token inputs (differentiable).
    softcap, temperature: the logit transform of `token_stats`.
    vocab_axis: which axis of w indexes the vocabulary.
    block_n, block_v: tokens per block (default: the most whose logits
      fit `ROW_BUDGET`) and vocabulary columns per matmul tile.

  Returns:
    (loss, TokenStats(logp, lse, entropy, smooth)): loss is a float32
    scalar differentiable w.r.t. h, w and rows; the statistics carry no
    gradient (use `token_stats` to differentiate through them).
  """
  h_NxD, w = _tiles.common_dtype(h_NxD, w)
  n, v = h_NxD.shape[0], w.shape[vocab_axis]
  if block_n is None:
    block_n = max(8, min(ROW_BUDGET // (4 * v), -(-n // 8) * 8) // 8 * 8)
  scaling = _tiles.Scaling(None if softcap is None else float(softcap),
                           float(temperature))
  static = Static(per_token, scaling, vocab_axis, int(block_n),
                  int(block_v or _xla.default_blocks(h_NxD.dtype)[1]),
                  jnp.dtype(h_NxD.dtype).name)
  y_N = jnp.where(targets_N == ignore_index, -1, targets_N).astype(jnp.int32)
  rows = jax.tree.map(lambda r: r.astype(jnp.float32), rows)
  loss, stats = _loss(h_NxD, w, y_N, rows, static)
  return loss, TokenStats(*jax.lax.stop_gradient(stats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss(h, w, y, rows, t: Static):
  # Not differentiated (eval): token_stats' single forward pass, which
  # always computes all four statistics (the flags only keep them).
  st = token_stats(h, w, y, softcap=t.scaling.softcap,
                   temperature=t.scaling.temperature, want_entropy=True,
                   label_smoothing=1.0, impl="xla", block_v=t.block_v,
                   vocab_axis=t.vocab_axis)
  return jnp.sum(t.per_token(st, rows)), tuple(st)


def _loss_fwd(h, w, y, rows, t: Static):
  loss, stats, dh, dw, d_rows = _with_grads(h, w, y, rows, t)
  return (loss, stats), (dh, dw, d_rows)


def _loss_bwd(t, res, ct):
  dh, dw, d_rows = res  # float32: cast once, after the scaling
  g = ct[0]  # cotangents of the (gradient-free) statistics are dropped
  return ((g * dh).astype(t.dtype), (g * dw).astype(t.dtype), None,
          jax.tree.map(lambda d: g * d, d_rows))


_loss.defvjp(_loss_fwd, _loss_bwd)


def _block_loss(st: _tiles.Stats, y, rows, t: Static, vocab):
  """A block's losses [T], stats [T] each, `stats_grad` coefficients and
  d loss / d rows, from its softmax accumulators."""
  logp, lse, entropy, smooth = (x[:, 0] for x in _tiles.finalize_stats(
      st, y, vocab))
  stats = TokenStats(logp, lse, entropy, smooth)
  loss_T, vjp = jax.vjp(t.per_token, stats, rows)
  g_stats, d_rows = vjp(jnp.ones_like(loss_T))
  coef = _tiles.stats_coefs(g_stats.logp, g_stats.lse, g_stats.entropy,
                            g_stats.smooth, y[:, 0] >= 0, lse, entropy, vocab)
  return loss_T, stats, coef, d_rows


def _with_grads(h, w, y, rows, t: Static):
  """-> loss, stats [N] each, and the unit-cotangent (dh, dw, d rows),
  float32."""
  ax = t.vocab_axis
  n, d, v = h.shape[0], h.shape[1], w.shape[ax]
  bn, bv, n_blocks, v_blocks = _xla.plan(n, v, t.block_n, t.block_v)
  pad = lambda x, val=0: _tiles.pad_rows(x, n_blocks * bn, val)
  blocks = lambda x: x.reshape((n_blocks, bn) + x.shape[1:])
  xs = (blocks(pad(h).astype(_xla.compute_dtype(h))), blocks(pad(y, -1)),
        jax.tree.map(lambda r: blocks(pad(r)), rows))
  row_ok = blocks(jnp.arange(n_blocks * bn) < n)

  def token_block(dw, blk):
    (h_b, y_b, rows_b), ok_b = blk
    y_b = y_b[:, None]
    s_row, st = _row_logits(h_b, w, y_b, t, bv, v_blocks)
    loss_T, stats, coef, d_rows = _block_loss(st, y_b, rows_b, t, v)
    # Padding rows: no loss, no gradient (whatever per_token does there).
    coef = jnp.where(ok_b[:, None], coef, 0.0)
    dh_b, dw = _row_grads(h_b, w, y_b, s_row, coef, dw, t, bv, v_blocks)
    loss = jnp.sum(jnp.where(ok_b, loss_T, 0.0))
    return dw, (loss, stats, dh_b, d_rows)

  dw0 = jnp.zeros(w.shape, jnp.float32)
  dw, (loss, stats, dh, d_rows) = jax.lax.scan(token_block, dw0,
                                               (xs, row_ok))
  cut = lambda x: x.reshape((n_blocks * bn,) + x.shape[2:])[:n]
  return (jnp.sum(loss), tuple(cut(x) for x in stats), cut(dh), dw,
          jax.tree.map(cut, d_rows))


def _row_logits(h_b, w, y_b, t: Static, bv, v_blocks):
  """A block's scaled logits for every column, `[T, V]` float32, and its
  softmax statistics (folded chunk by chunk, as in `token_stats`)."""
  v = w.shape[t.vocab_axis]

  def chunk(j, carry):
    s_row, st, w = carry
    w = _xla.opaque((w,))[0]  # keeps the upcast at chunk size
    v0, own = _xla.chunk_start(j, v, bv)
    w_c = _xla.chunks((w,), v0, bv, t.vocab_axis)
    s = _tiles.scale_logits(_xla.logits((h_b,), w_c, t.vocab_axis)[0],
                            t.scaling)
    cols = _tiles.col_ids((1, bv), v0)
    st = _tiles.update_stats(st, s, cols, _xla.owned(cols, own, v, bv), y_b)
    return jax.lax.dynamic_update_slice_in_dim(s_row, s, v0, axis=1), st, w

  init = (jnp.zeros((h_b.shape[0], v), jnp.float32),
          _tiles.init_stats(h_b.shape[0]), w)
  return jax.lax.fori_loop(0, v_blocks, chunk, init)[:2]


def _row_grads(h_b, w, y_b, s_row, coef, dw, t: Static, bv, v_blocks):
  """dh of a block and dw plus the block's share, chunk by chunk."""
  ax, v = t.vocab_axis, w.shape[t.vocab_axis]

  def chunk(j, carry):
    dh, dw, w = carry
    w = _xla.opaque((w,))[0]
    v0, own = _xla.chunk_start(j, v, bv)
    w_c = _xla.dv(_xla.chunks((w,), v0, bv, ax)[0], ax)
    s = jax.lax.dynamic_slice_in_dim(s_row, v0, bv, axis=1)
    cols = _tiles.col_ids((1, bv), v0)
    # Overlap columns (already summed by the previous chunk) get g = 0;
    # padding rows have zero coefficients, so g = 0 there too.
    ok = _xla.owned(cols, own, v, bv)
    g = _tiles.unscale_grad(_tiles.stats_grad(s, cols, ok, y_b, coef), s,
                            t.scaling)
    dh = dh + _tiles.matmul_nt(g, w_c)
    part = (_tiles.matmul_tn(h_b, g) if ax == 1 else  # [U, D] for [V, D]
            jax.lax.dot_general(g.astype(h_b.dtype), h_b,
                                (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32))
    dw_c = jax.lax.dynamic_slice_in_dim(dw, v0, bv, axis=ax) + part
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_c, v0, axis=ax), w

  dh0 = jnp.zeros((h_b.shape[0], h_b.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, v_blocks, chunk, (dh0, dw, w))[:2]
