"""Weighted cross-entropy whose gradient is formed in the forward pass.

For a scalar loss the per-token cotangents are known before the backward
pass runs, so `token_loss` computes (dh, dw) while it still holds each
token block's logits: three matmul passes over the unembedding (logits,
dh = g w^T, dw = h^T g) instead of the four of `token_stats` (logits and
moments forward, logits again and dw backward). Per-token cotangents that
only exist later (RL advantages, DPO margins) need `token_stats`.

The price is memory, paid only when the gradient is taken:
  - a block of `block_n` tokens keeps its scaled logits for the whole
    vocabulary, `[block_n, V]` float32 (default: at most `ROW_BUDGET`);
  - dw is summed over token blocks in float32 and held from the forward to
    the backward pass (for bf16 w, one float32 copy of the unembedding
    while it is summed). With a frozen unembedding (LoRA) XLA drops the dw
    sums: two passes (logits, dh), as with `token_stats`.

Without differentiation (eval) the loss costs `token_stats`' single pass.

  loss = Σ_n wt_n · (-(1 - ε)·logp_n - ε·smooth_n + z·lse_n²)

with logp, lse, smooth as in `token_stats` (targets < 0 are ignored: their
logp and smoothing terms are 0; their z-loss term is weighted by wt_n too).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tunejax.kernels import _tiles
from tunejax.kernels import _xla
from tunejax.kernels.token_stats import TokenStats, token_stats

# Default cap on one block's `[block_n, V]` float32 logits.
ROW_BUDGET = 128 << 20


class LossTerms(NamedTuple):
  """Static loss coefficients (ε, z) and the op's tiling."""
  label_smoothing: float
  z_loss: float
  scaling: _tiles.Scaling
  vocab_axis: int
  block_n: int
  block_v: int
  dtype: str  # of h and w


def token_loss(h_NxD, w, targets_N, weights_N, *, label_smoothing=0.0,
               z_loss=0.0, softcap=None, temperature=1.0, ignore_index=-1,
               vocab_axis: int = 1, block_n=None, block_v=None):
  """Weighted token cross-entropy sum and its statistics, in three passes.

  Args:
    h_NxD: final hidden states.
    w: unembedding `[D, V]` (or `[V, D]` with `vocab_axis=0`).
    targets_N: target ids; `ignore_index` and negative ids are ignored.
    weights_N: float per-token weights wt_n (differentiable).
    label_smoothing, z_loss: ε and z of the loss above.
    softcap, temperature: the logit transform of `token_stats`.
    vocab_axis: which axis of w indexes the vocabulary.
    block_n, block_v: tokens per block (default: the most whose logits
      fit `ROW_BUDGET`) and vocabulary columns per matmul tile.

  Returns:
    (loss, TokenStats(logp, lse, None, smooth)): loss is a float32 scalar
    differentiable w.r.t. h, w and weights_N; the statistics carry no
    gradient (use `token_stats` to differentiate through them).
  """
  h_NxD, w = _tiles.common_dtype(h_NxD, w)
  n, v = h_NxD.shape[0], w.shape[vocab_axis]
  if block_n is None:
    block_n = max(8, min(ROW_BUDGET // (4 * v), -(-n // 8) * 8) // 8 * 8)
  terms = LossTerms(float(label_smoothing), float(z_loss),
                    _tiles.Scaling(None if softcap is None else
                                   float(softcap), float(temperature)),
                    vocab_axis, int(block_n),
                    int(block_v or _xla.default_blocks()[1]),
                    jnp.dtype(h_NxD.dtype).name)
  y_N = jnp.where(targets_N == ignore_index, -1, targets_N).astype(jnp.int32)
  loss, stats = _loss(h_NxD, w, y_N, weights_N.astype(jnp.float32), terms)
  logp, lse, smooth = jax.lax.stop_gradient(stats)
  return loss, TokenStats(logp, lse, None,
                          smooth if label_smoothing else None)


def _per_token(logp, lse, smooth, wt, t: LossTerms):
  """The loss of each token (before the sum)."""
  eps = t.label_smoothing
  return wt * (-(1.0 - eps) * logp - eps * smooth + t.z_loss * lse**2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss(h, w, y, wt, t: LossTerms):
  # Not differentiated (eval): token_stats' single forward pass.
  st = token_stats(h, w, y, softcap=t.scaling.softcap,
                   temperature=t.scaling.temperature,
                   label_smoothing=t.label_smoothing, impl="xla",
                   block_v=t.block_v, vocab_axis=t.vocab_axis)
  smooth = st.smooth if t.label_smoothing else jnp.zeros_like(st.lse)
  return (jnp.sum(_per_token(st.logp, st.lse, smooth, wt, t)),
          (st.logp, st.lse, smooth))


def _loss_fwd(h, w, y, wt, t: LossTerms):
  logp, lse, smooth, dh, dw = _with_grads(h, w, y, wt, t)
  unit_N = _per_token(logp, lse, smooth, 1.0, t)  # d loss / d wt
  return (jnp.sum(wt * unit_N), (logp, lse, smooth)), (dh, dw, unit_N)


def _loss_bwd(t, res, ct):
  dh, dw, unit_N = res  # float32: cast once, after the scaling
  g = ct[0]  # cotangents of the (gradient-free) statistics are dropped
  return ((g * dh).astype(t.dtype), (g * dw).astype(t.dtype), None,
          g * unit_N)


_loss.defvjp(_loss_fwd, _loss_bwd)


def _coefs(st: _tiles.Stats, y, wt, t: LossTerms, vocab):
  """(logp, lse, smooth) [T, 1] and the `stats_grad` coefficients of the
  loss w.r.t. them."""
  logp, lse, entropy, smooth = _tiles.finalize_stats(st, y, vocab)
  eps = t.label_smoothing
  coef = _tiles.stats_coefs((-(1.0 - eps) * wt)[:, 0],
                            (2.0 * t.z_loss * wt * lse)[:, 0],
                            jnp.zeros_like(wt[:, 0]), (-eps * wt)[:, 0],
                            (y >= 0)[:, 0], lse[:, 0], entropy[:, 0], vocab)
  return logp, lse, smooth, coef


def _with_grads(h, w, y, wt, t: LossTerms):
  """-> logp, lse, smooth [N] and the unit-cotangent (dh, dw), float32."""
  ax = t.vocab_axis
  n, d, v = h.shape[0], h.shape[1], w.shape[ax]
  bn, bv, n_blocks, v_blocks = _xla.plan(n, v, t.block_n, t.block_v)
  pad = lambda x, val=0: _tiles.pad_rows(x, n_blocks * bn, val)
  blocks = lambda x: x.reshape((n_blocks, bn) + x.shape[1:])
  xs = (blocks(pad(h).astype(_xla.compute_dtype(h))), blocks(pad(y, -1)),
        blocks(pad(wt)))

  def token_block(dw, blk):
    h_b, y_b, wt_b = blk
    y_b, wt_b = y_b[:, None], wt_b[:, None]
    s_row, st = _row_logits(h_b, w, y_b, t, bv, v_blocks)
    logp, lse, smooth, coef = _coefs(st, y_b, wt_b, t, v)
    dh_b, dw = _row_grads(h_b, w, y_b, s_row, coef, dw, t, bv, v_blocks)
    return dw, (logp[:, 0], lse[:, 0], smooth[:, 0], dh_b)

  dw0 = jnp.zeros(w.shape, jnp.float32)
  dw, (logp, lse, smooth, dh) = jax.lax.scan(token_block, dw0, xs)
  cut = lambda x: x.reshape((n_blocks * bn,) + x.shape[2:])[:n]
  return cut(logp), cut(lse), cut(smooth), cut(dh).reshape(n, d), dw


def _row_logits(h_b, w, y_b, t: LossTerms, bv, v_blocks):
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


def _row_grads(h_b, w, y_b, s_row, coef, dw, t: LossTerms, bv, v_blocks):
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
