"""Pallas TPU (Mosaic) bodies of token_stats.

Grid-pipelined: BlockSpecs stream (block_n, D) rows of h and (D, block_v)
columns of w through VMEM; the reduction axis is the last ("arbitrary") grid
axis and running values live in VMEM scratch. Tiling rules: block_n is a
multiple of 8, block_v of 128 (or the whole V), D is never split (a full
dimension is always a legal block), per-token vectors are (block_n, 1).

The forward can also stream the `_tiles.Moments` (`[block_n, D]` VMEM
accumulators), from which the op forms dh without another pass over the
logits. Backward is then one kernel for dw that recomputes the logit tile
(and is dropped by XLA when w is frozen); without moments a second kernel
reduces dh over vocabulary blocks (TPU output blocks must be revisited
consecutively, so one kernel cannot reduce both).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tunejax.kernels import _tiles

_N_STATS = len(_tiles.Stats._fields)
# VMEM for the forward's [block_n, D] moment blocks: token blocks shrink to
# fit it at large D (D = 8192 with entropy: block_n 128).
_MOMENT_VMEM = 24 * 2**20


def _blocks(n, v, cfg):
  block_v = v if v <= cfg.block_v else cfg.block_v
  if block_v != v and block_v % 128:
    raise ValueError(f"pallas_tpu block_v={block_v} must be a multiple of 128")
  block_n = min(cfg.block_n, -(-n // 8) * 8)
  if block_n % 8:
    raise ValueError(f"pallas_tpu block_n={block_n} must be a multiple of 8")
  return block_n, block_v


def _params(interpret, block_n, block_v, d, itemsize, n_moments=0):
  """Grid semantics and a scoped-VMEM limit sized to the blocks.

  The default scoped VMEM (16 MiB on most chips) is too small for
  double-buffered (D, block_v) weight blocks plus a (block_n or block_v, D)
  float32 accumulator once D reaches a few thousand; 64 MiB fits every
  current TPU generation.
  """
  need = (2 * (block_n + block_v) * d * itemsize      # double-buffered inputs
          + 6 * block_n * block_v * 4                 # logit tile temporaries
          + max(block_n, block_v) * d * (4 + 2 * itemsize)  # acc + output
          + n_moments * block_n * d * 4 * 3)  # moment scratch + outputs
  limit = int(min(max(2 * need, 32 * 2**20), 64 * 2**20))
  return dict(interpret=interpret, compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit))


def _scaled_tile(h_ref, w_ref, v_block, block_v, vocab, sc):
  """Scaled logits of this tile, its column ids and the in-vocab mask."""
  w = w_ref[...]
  cols = _tiles.col_ids((1, block_v), v_block * block_v)
  if vocab % block_v:
    # The last block reads past V: zero it so garbage cannot reach a dot.
    w = jnp.where(cols < vocab, w, jnp.zeros_like(w))
  s = _tiles.scale_logits(_tiles.matmul(h_ref[...], w), sc)
  return s, cols, cols < vocab, w


def _fwd_kernel(h_ref, w_ref, y_ref, *refs, sc, vocab, block_v, n_out,
                moment_fields):
  """Streams one vocabulary tile into the running stats (and moments).

  refs: n_out output refs (4 stats, then the moments), then the stats
  scratch, then the moment scratch (`moment_fields`: which of the optional
  `_tiles.Moments` fields exist).
  """
  outs, acc_refs = refs[:n_out], refs[n_out:n_out + _N_STATS]
  mo_refs = refs[n_out + _N_STATS:]
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    for ref, x in zip(acc_refs, _tiles.init_stats(y_ref.shape[0])):
      ref[...] = x
    for ref in mo_refs:
      ref[...] = jnp.zeros_like(ref)

  s, cols, col_ok, w = _scaled_tile(h_ref, w_ref, j, block_v, vocab, sc)
  y = y_ref[...]
  st = _tiles.Stats(*(ref[...] for ref in acc_refs))
  new = _tiles.update_stats(st, s, cols, col_ok, y)
  for ref, x in zip(acc_refs, new):
    ref[...] = x
  mo = None
  if mo_refs:
    mo = _tiles.update_moments(_read_moments(mo_refs, moment_fields), st.m,
                               new.m, s, col_ok, w, sc)
    _write(mo_refs, mo)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    _write(outs[:4], _tiles.finalize_stats(new, y, vocab))
    if mo is not None:
      _write(outs[4:], _tiles.finalize_moments(mo, new))


def _read_moments(refs, fields):
  it = iter(refs)
  return _tiles.Moments(next(it)[...], *(next(it)[...] if f else None
                                        for f in fields))


def _write(refs, values):
  for ref, x in zip(refs, [x for x in values if x is not None]):
    ref[...] = x


def forward(h, w, y, cfg, moments: bool = False):
  """[N, 4] stats; with `moments`, also the finalized `_tiles.Moments`
  (`[N, D]` accumulators in VMEM next to the per-token stats)."""
  n, (d, v) = h.shape[0], w.shape
  fields = _tiles.moment_fields(cfg) if moments else (False, False)
  n_mo = (1 + sum(fields)) if moments else 0
  bn, bv = _blocks(n, v, cfg)
  if n_mo:  # Each moment holds a scratch and two output (bn, D) f32 blocks.
    bn = min(bn, max(8, _MOMENT_VMEM // (n_mo * 3 * d * 4) // 8 * 8))
  n_pad = -(-n // bn) * bn
  col = lambda i, j: (i, 0)
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, sc=cfg.scaling, vocab=v, block_v=bv,
                        n_out=4 + n_mo, moment_fields=fields),
      grid=(n_pad // bn, pl.cdiv(v, bv)),
      in_specs=[pl.BlockSpec((bn, d), col),
                pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                pl.BlockSpec((bn, 1), col)],
      out_specs=[pl.BlockSpec((bn, 1), col)] * 4
      + [pl.BlockSpec((bn, d), col)] * n_mo,
      out_shape=[jax.ShapeDtypeStruct((n_pad, 1), jnp.float32)] * 4
      + [jax.ShapeDtypeStruct((n_pad, d), jnp.float32)] * n_mo,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * _N_STATS
      + [pltpu.VMEM((bn, d), jnp.float32)] * n_mo,
      **_params(cfg.interpret, bn, bv, d, w.dtype.itemsize, n_mo),
  )(_tiles.pad_rows(h, n_pad), w,
    _tiles.pad_rows(y[:, None], n_pad))
  stats = jnp.concatenate(outs[:4], axis=1)[:n]
  if not moments:
    return stats
  it = iter(o[:n] for o in outs[4:])
  return stats, _tiles.Moments(next(it), *(next(it) if f else None
                                           for f in fields))


def _grad_tile(h_ref, w_ref, y_ref, coef_ref, i, j, *, sc, vocab, rows,
               block_n, block_v):
  """dL/dz of tile (i, j) and the (masked) w block it came from."""
  s, cols, col_ok, w = _scaled_tile(h_ref, w_ref, j, block_v, vocab, sc)
  row_ids = i * block_n + jax.lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)
  ok = jnp.logical_and(col_ok, row_ids < rows)
  g = _tiles.stats_grad(s, cols, ok, y_ref[...], coef_ref)
  return _tiles.unscale_grad(g, s, sc), w


def _dh_kernel(h_ref, w_ref, y_ref, coef_ref, dh_ref, acc_ref, **kw):
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  g, w = _grad_tile(h_ref, w_ref, y_ref, coef_ref, i, j, **kw)
  acc_ref[...] += _tiles.matmul_nt(g, w)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, y_ref, coef_ref, dw_ref, acc_ref, **kw):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  g, _ = _grad_tile(h_ref, w_ref, y_ref, coef_ref, i, j, **kw)
  acc_ref[...] += _tiles.matmul_tn(h_ref[...], g)

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def backward(h, w, y, coef, cfg, want_dh: bool = True):
  """(dh, dw); with `want_dh=False` only the dw kernel (dh is None)."""
  n, (d, v) = h.shape[0], w.shape
  bn, bv = _blocks(n, v, cfg)
  n_pad = -(-n // bn) * bn
  nb, vb = n_pad // bn, pl.cdiv(v, bv)
  kw = dict(sc=cfg.scaling, vocab=v, rows=n, block_n=bn, block_v=bv)
  params = _params(cfg.interpret, bn, bv, d, w.dtype.itemsize)
  args = (_tiles.pad_rows(h, n_pad), w, _tiles.pad_rows(y[:, None], n_pad),
          _tiles.pad_rows(coef, n_pad))

  def specs(ij):  # ij: grid indices -> (token block, vocab block)
    return [pl.BlockSpec((bn, d), lambda *g: (ij(*g)[0], 0)),
            pl.BlockSpec((d, bv), lambda *g: (0, ij(*g)[1])),
            pl.BlockSpec((bn, 1), lambda *g: (ij(*g)[0], 0)),
            pl.BlockSpec((bn, _tiles.N_COEFS), lambda *g: (ij(*g)[0], 0))]

  dh = None
  if want_dh:
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, **kw), grid=(nb, vb),
        in_specs=specs(lambda i, j: (i, j)),
        out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n_pad, d), h.dtype),
        scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
        **params,
    )(*args)[:n]
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, **kw), grid=(vb, nb),
      in_specs=specs(lambda j, i: (i, j)),
      out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      out_shape=jax.ShapeDtypeStruct((d, v), w.dtype),
      scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
      **params,
  )(*args)
  return dh, dw
