"""The fused token-loss op: per-token log-prob, logsumexp, entropy, smoothing.

`token_stats(h_NxD, w_DxV, targets_N)` computes what every token-level loss
needs from the unembedding without ever holding `[N, V]` logits: the forward
streams over vocabulary tiles keeping per-token running statistics; the
backward (a `jax.custom_vjp`) recomputes each logit tile from the saved
logsumexp and turns arbitrary per-token cotangents (SFT masks, DPO weights,
RL advantages) into dh and dw.

Equivalent JAX code::

  s = softcap * tanh(h @ w / softcap) / temperature     # [N, V] float32
  lse = logsumexp(s, -1)
  logp = where(targets == ignore_index, 0, s[targets] - lse)
  entropy = -sum(softmax(s) * log_softmax(s), -1)
  smooth = mean(log_softmax(s), -1)

z-loss is `lse ** 2` and label smoothing `-(1 - eps) * logp - eps * smooth`,
both formed by the caller and differentiable through this op.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tunejax import errors
from tunejax.kernels import _reference
from tunejax.kernels import _tiles
from tunejax.kernels import _xla

IMPLS = ("auto", "naive", "xla", "pallas", "pallas_tpu", "pallas_gpu")


class TokenStats(NamedTuple):
  """Per-token float32 statistics; optional fields are None unless asked."""
  logp: jax.Array
  lse: jax.Array
  entropy: jax.Array | None = None
  smooth: jax.Array | None = None


class Config(NamedTuple):
  """Static (hashable) options of one op instance."""
  scaling: _tiles.Scaling
  want_entropy: bool
  want_smooth: bool
  impl: str
  block_n: int
  block_v: int
  interpret: bool
  vocab_axis: int = 1  # of w: 1 for [D, V], 0 for [V, D]


# Default tiles (block_n, block_v) of the Pallas bodies: TPU tiles fit VMEM
# with double buffering for D up to ~4k; Triton tiles are register-sized.
# The XLA path's depend on the backend (`_xla.default_blocks`).
BLOCKS = {"pallas_tpu": (256, 512), "pallas_gpu": (256, 128)}
# Triton dots walk D in power-of-2 chunks of at least 16 that divide it.
_TRITON_D_MULTIPLE = 16
# Default matmul precisions that make float32 products exact float32. Triton
# runs such a dot as FMA loops without tensor cores: on an H100 the W1
# forward took 89 ms of a 115 ms step, where cuBLAS's SGEMM tiles (the
# chunked path) take a few ms.
_IEEE_F32 = ("float32", "highest")


def _auto_gpu_impl(d: int, dtype) -> str:
  """'auto' on a GPU: the Triton body, unless it cannot tile D or the
  inputs are float32 at the highest matmul precision (see `_IEEE_F32`)."""
  ieee = (jnp.dtype(dtype) == jnp.float32 and
          jax.config.jax_default_matmul_precision in _IEEE_F32)
  return "xla" if d % _TRITON_D_MULTIPLE or ieee else "pallas_gpu"


def resolve_impl(impl: str) -> str:
  """Maps 'auto' / 'pallas' to a concrete implementation for this backend."""
  if impl not in IMPLS:
    raise errors.ConfigError(f"token_stats impl={impl!r}: expected one of "
                             f"{IMPLS}")
  backend = jax.default_backend()
  if impl == "auto":
    impl = "xla" if backend == "cpu" else "pallas"
  if impl == "pallas":
    impl = "pallas_gpu" if backend in ("gpu", "cuda", "rocm") else "pallas_tpu"
  return impl


def make_config(impl="auto", *, softcap=None, temperature=1.0,
                want_entropy=False, want_smooth=False, block_n=None,
                block_v=None, interpret=None, dtype=jnp.float32) -> Config:
  impl = resolve_impl(impl)
  default_n, default_v = BLOCKS.get(impl) or _xla.default_blocks(dtype)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  return Config(
      _tiles.Scaling(None if softcap is None else float(softcap),
                     float(temperature)),
      bool(want_entropy), bool(want_smooth), impl, block_n or default_n,
      block_v or default_v, bool(interpret))


def token_stats(h_NxD, w, targets_N, *, softcap=None, temperature=1.0,
                ignore_index=-1, want_entropy=False, label_smoothing=0.0,
                impl="auto", block_v=None, block_n=None,
                interpret=None, vocab_axis: int = 1) -> TokenStats:
  """Per-token statistics of softmax(softcap(h @ w) / temperature).

  Args:
    h_NxD: final hidden states (any float dtype; bf16 is accumulated in f32).
    w: unembedding, `[D, V]`, or `[V, D]` with `vocab_axis=0` (a tied
      embedding table as it is: no transposed copy of it is made on the
      XLA path and by the Triton body).
    targets_N: int target ids; `ignore_index` (and any negative id) marks
      tokens without a target: their logp is 0 and gets no gradient.
    softcap: final-logit soft cap (Gemma 2), or None.
    temperature: divides the (capped) logits.
    ignore_index: see targets_N.
    want_entropy: also return the entropy of each token's distribution.
    label_smoothing: when > 0, also return `smooth` = mean log-prob over
      the vocabulary (the caller weights it by the smoothing epsilon).
    impl: 'auto' (Pallas on TPU/GPU, XLA on CPU and on a GPU when D is not
      a multiple of 16 or the inputs are float32 under the "float32" /
      "highest" default matmul precision), 'xla' (chunked, any backend),
      'pallas' (the backend's Pallas body), 'pallas_tpu', 'pallas_gpu', or
      'naive' (materialises logits; reference/baseline).
    block_v, block_n: tile sizes (defaults per implementation: `BLOCKS`,
      and `_xla.default_blocks()` for the chunked path).
    interpret: run Pallas bodies in interpret mode (default: on CPU).
    vocab_axis: which axis of w indexes the vocabulary.

  Returns:
    TokenStats of float32 `[N]` arrays, differentiable w.r.t. h and w.
  """
  h_NxD, w = _tiles.common_dtype(h_NxD, w)
  if impl == "auto" and resolve_impl(impl) == "pallas_gpu":
    impl = _auto_gpu_impl(h_NxD.shape[1], w.dtype)
  cfg = make_config(impl, softcap=softcap, temperature=temperature,
                    want_entropy=want_entropy,
                    want_smooth=label_smoothing > 0, block_n=block_n,
                    block_v=block_v, interpret=interpret, dtype=w.dtype)
  y_N = jnp.where(targets_N == ignore_index, -1, targets_N).astype(jnp.int32)
  if vocab_axis not in (0, 1):
    raise errors.ConfigError(f"token_stats vocab_axis={vocab_axis}: "
                             "expected 1 (w is [D, V]) or 0 ([V, D])")
  if vocab_axis == 0 and cfg.impl not in ("xla", "pallas_gpu"):
    w, vocab_axis = w.T, 1  # the other bodies take [D, V]
  cfg = cfg._replace(vocab_axis=vocab_axis)
  if cfg.impl == "naive":
    out = _reference.token_stats(h_NxD, w, y_N, cfg.scaling)
  else:
    out = _op(h_NxD, w, y_N, cfg)
  logp, lse, entropy, smooth = out
  return TokenStats(logp, lse, entropy if cfg.want_entropy else None,
                    smooth if cfg.want_smooth else None)


# ----------------------------------------------------------------------------
# custom_vjp plumbing; implementations provide forward(h, w, y, cfg) ->
# [N, 4] (logp, lse, entropy, smooth) and backward(h, w, y, coef, cfg) ->
# (dh, dw).


def _xla_forward(h, w, y, cfg: Config, moments: bool = False):
  """[N, 4] stats; with `moments`, also the finalized `_tiles.Moments`."""
  want_plw, want_uw = _tiles.moment_fields(cfg)

  def init(rows):
    mo = (_tiles.init_moments(rows, h.shape[1], want_plw, want_uw)
          if moments else None)
    return _tiles.init_stats(rows), mo

  def fold(carry, z, cols, col_ok, rows, w_cs):
    st, mo = carry
    s = _tiles.scale_logits(z[0], cfg.scaling)
    new = _tiles.update_stats(st, s, cols, col_ok, rows[0])
    if mo is not None:
      mo = _tiles.update_moments(mo, st.m, new.m, s, col_ok, w_cs[0],
                                 cfg.scaling)
    return new, mo

  def finish(carry, rows):
    st, mo = carry
    out = jnp.concatenate(_tiles.finalize_stats(
        st, rows[0], w.shape[cfg.vocab_axis]), axis=1)
    if mo is None:
      return (out,)
    return (out,) + tuple(x for x in _tiles.finalize_moments(mo, st)
                          if x is not None)

  out = _xla.forward(((h, w),), (y[:, None],), init, fold, finish,
                     block_n=cfg.block_n, block_v=cfg.block_v,
                     vocab_axis=cfg.vocab_axis)
  if not moments:
    return out[0]
  mo = iter(out[1:])
  return out[0], _tiles.Moments(next(mo), next(mo) if want_plw else None,
                                next(mo) if want_uw else None)


def _moments_dh(h, w, y, coef, out, mo: _tiles.Moments, cfg: Config):
  """dh from the forward's moments (see `_tiles.moments_dh`)."""
  y_ok = jnp.maximum(y, 0)
  w_y = jnp.take(w, y_ok, axis=cfg.vocab_axis)
  w_y = (w_y if cfg.vocab_axis == 0 else w_y.T).astype(jnp.float32)
  s_y = (out[:, 0] + out[:, 1])[:, None]  # logp + lse = target's s
  u_y = _tiles.unscale_grad(jnp.ones_like(s_y), s_y, cfg.scaling)
  uw = mo.uw
  if cfg.want_smooth and uw is None:  # no softcap: u is the constant 1/T
    uw = jnp.sum(w.astype(jnp.float32), axis=cfg.vocab_axis)[None] / (
        cfg.scaling.temperature)
  return _tiles.moments_dh(coef, mo, w_y, u_y, uw).astype(h.dtype)


def _xla_backward(h, w, y, coef, cfg: Config, want_dh: bool = True):
  def grad(z, cols, ok, rows):
    s = _tiles.scale_logits(z[0], cfg.scaling)
    g = _tiles.stats_grad(s, cols, ok, rows[0], rows[1])
    return _tiles.unscale_grad(g, s, cfg.scaling)

  return _xla.backward(((h, w),), (y[:, None], coef), grad,
                       block_n=cfg.block_n, block_v=cfg.block_v,
                       want_dh=want_dh, vocab_axis=cfg.vocab_axis)


def _impl(cfg: Config):
  if cfg.impl == "xla":
    return _xla_forward, _xla_backward
  if cfg.impl == "pallas_tpu":
    # Imported lazily: Pallas is only needed when asked for.
    from tunejax.kernels import _pallas_tpu  # pylint: disable=g-import-not-at-top
    return _pallas_tpu.forward, _pallas_tpu.backward
  from tunejax.kernels import _pallas_gpu  # pylint: disable=g-import-not-at-top

  def gpu_backward(h, w, y, coef, cfg):
    # cuBLAS tiles: the Triton backward's atomic dh/dw adds measured 8x
    # slower on an H100 (see `_pallas_gpu`).
    bn, bv = _xla.default_blocks()
    return _xla_backward(h, w, y, coef, cfg._replace(block_n=bn, block_v=bv))

  return _pallas_gpu.forward, gpu_backward


# Bodies whose forward streams the `_tiles.Moments`, so dh needs no backward
# logit pass. The Triton body does not: its [block_n, D] accumulators would
# not fit in registers / shared memory for real D (its backward is the XLA
# chunked one, see `_pallas_gpu`).
_WITH_MOMENTS = ("xla", "pallas_tpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _op(h, w, y, cfg):
  out = _impl(cfg)[0](h, w, y, cfg)
  return tuple(out[:, i] for i in range(4))


def _op_fwd(h, w, y, cfg):
  # Only per-token scalars (and, with moments, the [N, D] sums that give dh
  # without a backward logit pass) are saved besides the inputs.
  if cfg.impl not in _WITH_MOMENTS:
    out = _op(h, w, y, cfg)
    return out, (h, w, y, jnp.stack(out, axis=1), None)
  out, mo = _impl(cfg)[0](h, w, y, cfg, moments=True)
  return tuple(out[:, i] for i in range(4)), (h, w, y, out, mo)


def _op_bwd(cfg, res, ct):
  h, w, y, out, mo = res
  # Outputs the caller dropped arrive as zero cotangents.
  g_logp, g_lse, g_ent, g_smooth = ct
  coef = _tiles.stats_coefs(g_logp, g_lse, g_ent, g_smooth, y >= 0,
                            out[:, 1], out[:, 2], w.shape[cfg.vocab_axis])
  backward = _impl(cfg)[1]
  if mo is None:
    dh, dw = backward(h, w, y, coef, cfg)
    return dh, dw, None
  # dw alone needs the logit tiles again; when w is frozen XLA drops that
  # pass, leaving two matmul passes in all (forward logits and moments).
  _, dw = backward(h, w, y, coef, cfg, want_dh=False)
  return _moments_dh(h, w, y, coef, out, mo, cfg), dw, None


_op.defvjp(_op_fwd, _op_bwd)
