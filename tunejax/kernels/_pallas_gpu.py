"""Pallas GPU (Triton) bodies of token_stats.

Triton programs of a grid run concurrently, so reductions happen inside a
program (loops over vocabulary and D chunks) or through atomics, never by
revisiting an output block. Triton arrays must have power-of-2 shapes, so D
(640 for Gemma 3 270M) is walked in power-of-2 chunks `block_d` that divide
it, and the ragged end of the vocabulary uses masked loads and a padded dw.

forward: grid over token blocks; each program streams all vocabulary blocks
  (online logsumexp, as in Cut Cross-Entropy's forward).
backward: grid over (token block, vocabulary block); each program recomputes
  its logit tile and atomically adds its dh and dw contributions (float32).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tunejax.kernels import _tiles


def _pow2_at_most(x):
  return 1 << (max(int(x), 1).bit_length() - 1)


def _blocks(n, d, cfg):
  block_d = next((b for b in (64, 32, 16) if d % b == 0), None)
  if block_d is None:
    raise ValueError(f"pallas_gpu needs D divisible by 16, got D={d}; use "
                     "impl='xla'")
  block_n = min(_pow2_at_most(cfg.block_n), max(16, 1 << (n - 1).bit_length()))
  return block_n, _pow2_at_most(cfg.block_v), block_d


def _params(cfg):
  return dict(interpret=cfg.interpret,
              compiler_params=plt.CompilerParams(num_warps=4, num_stages=2))


def _w_chunk(w_ref, k, j, block_d, block_v, vocab):
  """(block_d, block_v) slice of w; zeros past the end of the vocabulary."""
  cols = _tiles.col_ids((1, block_v), j * block_v)
  idx = (pl.ds(k * block_d, block_d), pl.ds(j * block_v, block_v))
  mask = jnp.broadcast_to(cols < vocab, (block_d, block_v))
  return plt.load(w_ref.at[idx], mask=mask, other=0.0)


def _h_chunk(h_ref, i, k, block_n, block_d):
  return h_ref[pl.ds(i * block_n, block_n), pl.ds(k * block_d, block_d)]


def _scaled_tile(h_ref, w_ref, i, j, *, sc, vocab, block_n, block_v, block_d):
  """Scaled logit tile (i, j) with its column ids and in-vocab mask."""
  def add_chunk(k, z):
    h = _h_chunk(h_ref, i, k, block_n, block_d)
    return z + _tiles.matmul(h, _w_chunk(w_ref, k, j, block_d, block_v, vocab))

  z = jax.lax.fori_loop(0, h_ref.shape[1] // block_d, add_chunk,
                        jnp.zeros((block_n, block_v), jnp.float32))
  cols = _tiles.col_ids((1, block_v), j * block_v)
  return _tiles.scale_logits(z, sc), cols, cols < vocab


def _fwd_kernel(h_ref, w_ref, y_ref, logp_ref, lse_ref, ent_ref, smooth_ref,
                **kw):
  i, vocab = pl.program_id(0), kw["vocab"]
  y = y_ref[...]

  def vocab_block(j, st):
    s, cols, col_ok = _scaled_tile(h_ref, w_ref, i, j, **kw)
    return _tiles.update_stats(st, s, cols, col_ok, y)

  st = jax.lax.fori_loop(0, pl.cdiv(vocab, kw["block_v"]), vocab_block,
                         _tiles.init_stats(kw["block_n"]))
  outs = _tiles.finalize_stats(st, y, vocab)
  for ref, x in zip((logp_ref, lse_ref, ent_ref, smooth_ref), outs):
    ref[...] = x


def _pad_rows(x, rows):
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def forward(h, w, y, cfg):
  n, (d, v) = h.shape[0], w.shape
  bn, bv, bd = _blocks(n, d, cfg)
  n_pad = -(-n // bn) * bn
  kw = dict(sc=cfg.scaling, vocab=v, block_n=bn, block_v=bv, block_d=bd)
  whole = pl.BlockSpec(memory_space=pl.ANY)
  row = pl.BlockSpec((bn, 1), lambda i: (i, 0))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, **kw), grid=(n_pad // bn,),
      in_specs=[whole, whole, row], out_specs=[row] * 4,
      out_shape=[jax.ShapeDtypeStruct((n_pad, 1), jnp.float32)] * 4,
      **_params(cfg),
  )(_pad_rows(h, n_pad), w, _pad_rows(y[:, None], n_pad))
  return jnp.concatenate(outs, axis=1)[:n]


def _bwd_kernel(h_ref, w_ref, y_ref, coef_ref, dh_in, dw_in, dh_ref, dw_ref,
                *, rows, **kw):
  del dh_in, dw_in  # aliased to dh_ref / dw_ref (zero-initialised)
  i, j = pl.program_id(0), pl.program_id(1)
  bn, bv, bd, vocab = kw["block_n"], kw["block_v"], kw["block_d"], kw["vocab"]
  s, cols, col_ok = _scaled_tile(h_ref, w_ref, i, j, **kw)
  row_ids = i * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
  ok = jnp.logical_and(col_ok, row_ids < rows)
  g = _tiles.stats_grad(s, cols, ok, y_ref[...], coef_ref)
  g = _tiles.unscale_grad(g, s, kw["sc"])

  def d_chunk(k, carry):
    w = _w_chunk(w_ref, k, j, bd, bv, vocab)
    h = _h_chunk(h_ref, i, k, bn, bd)
    plt.atomic_add(dh_ref, (pl.ds(i * bn, bn), pl.ds(k * bd, bd)),
                   _tiles.matmul_nt(g, w))
    plt.atomic_add(dw_ref, (pl.ds(k * bd, bd), pl.ds(j * bv, bv)),
                   _tiles.matmul_tn(h, g))
    return carry

  jax.lax.fori_loop(0, h_ref.shape[1] // bd, d_chunk, 0)


def backward(h, w, y, coef, cfg):
  n, (d, v) = h.shape[0], w.shape
  bn, bv, bd = _blocks(n, d, cfg)
  n_pad = -(-n // bn) * bn
  # dw is padded to whole vocabulary blocks: the ragged block's extra
  # columns receive zeros (masked atomics do not run in interpret mode).
  v_pad = pl.cdiv(v, bv) * bv
  kw = dict(sc=cfg.scaling, vocab=v, block_n=bn, block_v=bv, block_d=bd)
  whole = pl.BlockSpec(memory_space=pl.ANY)
  rows = lambda width: pl.BlockSpec((bn, width), lambda i, j: (i, 0))
  dh, dw = pl.pallas_call(
      functools.partial(_bwd_kernel, rows=n, **kw),
      grid=(n_pad // bn, pl.cdiv(v, bv)),
      in_specs=[whole, whole, rows(1), rows(_tiles.N_COEFS), whole, whole],
      out_specs=[whole, whole],
      out_shape=[jax.ShapeDtypeStruct((n_pad, d), jnp.float32),
                 jax.ShapeDtypeStruct((d, v_pad), jnp.float32)],
      input_output_aliases={4: 0, 5: 1},
      **_params(cfg),
  )(_pad_rows(h, n_pad), w, _pad_rows(y[:, None], n_pad),
    _pad_rows(coef, n_pad), jnp.zeros((n_pad, d), jnp.float32),
    jnp.zeros((d, v_pad), jnp.float32))
  return dh[:n].astype(h.dtype), dw[:, :v].astype(w.dtype)
