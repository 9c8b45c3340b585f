"""Per-token full-vocabulary KL between a policy and a reference, fused.

`token_kl(h, w, h_ref, w_ref)` streams over vocabulary tiles of both
`h @ w` and `h_ref @ w_ref` at once, so neither `[N, V]` distribution ever
exists. Used by Anchored SFT (KL(p_ref || p), the forward direction), token
level DPO (TDPO: KL(p_ref || p) per token) and distillation.

Equivalent JAX code::

  logp = log_softmax(softcap(h @ w) / temperature)
  logq = log_softmax(softcap(h_ref @ w_ref) / temperature)
  forward: sum(exp(logq) * (logq - logp), -1)     # KL(p_ref || p)
  reverse: sum(exp(logp) * (logp - logq), -1)     # KL(p || p_ref)

One pass: with weights u = q (forward) or u = p (reverse) and the other
distribution o, KL = E_u[s_u - s_o] - lse_u + lse_o, where E_u[s_u - s_o]
is a streaming sum re-based on u's running max like a logsumexp.
Gradient w.r.t. the policy's scaled logits: forward p - q; reverse
p * (log p - log q - KL). The reference is a constant (no gradient).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tunejax import errors
from tunejax.kernels import _reference
from tunejax.kernels import _tiles
from tunejax.kernels import _xla

DIRECTIONS = ("forward", "reverse")


class _Cfg(NamedTuple):
  reverse: bool
  scaling: _tiles.Scaling
  block_n: int
  block_v: int


class _Acc(NamedTuple):
  m_p: jax.Array
  l_p: jax.Array
  m_q: jax.Array
  l_q: jax.Array
  cross: jax.Array  # sum exp(s_u - m_u) * (s_u - s_o)


def token_kl(h_NxD, w_DxV, h_ref_NxD, w_ref_DxV, *, direction="forward",
             softcap=None, temperature=1.0, impl="auto", block_n=None,
             block_v=None):
  """Per-token KL(p_ref || p) ('forward') or KL(p || p_ref) ('reverse').

  Args:
    h_NxD, w_DxV: policy hidden states and unembedding (differentiable).
    h_ref_NxD, w_ref_DxV: reference pair (treated as constants); w_ref may
      be the same array as w (e.g. LoRA not touching the head).
    direction: 'forward' (reference first, as in Anchored SFT) or 'reverse'.
    softcap, temperature: applied to both distributions' logits.
    impl: 'auto' / 'xla' (chunked, any backend) or 'naive' (materialises
      both `[N, V]` log-softmaxes; reference).
    block_n, block_v: tile sizes of the chunked path (default:
      `_xla.default_blocks()`).

  Returns:
    float32 `[N]` KL per token.
  """
  if direction not in DIRECTIONS:
    raise errors.ConfigError(f"token_kl direction={direction!r}: expected "
                             f"one of {DIRECTIONS}")
  if impl not in ("auto", "xla", "naive"):
    raise errors.ConfigError(f"token_kl impl={impl!r}: expected 'auto', "
                             "'xla' or 'naive'")
  sc = _tiles.Scaling(None if softcap is None else float(softcap),
                      float(temperature))
  h_ref_NxD, w_ref_DxV = jax.lax.stop_gradient((h_ref_NxD, w_ref_DxV))
  h_NxD, w_DxV = _tiles.common_dtype(h_NxD, w_DxV)
  h_ref_NxD, w_ref_DxV = _tiles.common_dtype(h_ref_NxD, w_ref_DxV)
  if impl == "naive":
    return _reference.token_kl(h_NxD, w_DxV, h_ref_NxD, w_ref_DxV,
                               direction == "reverse", sc)
  default_n, default_v = _xla.default_blocks(w_DxV.dtype)
  cfg = _Cfg(direction == "reverse", sc, block_n or default_n,
             block_v or default_v)
  return _kl(h_NxD, w_DxV, h_ref_NxD, w_ref_DxV, cfg)


def _forward(h, w, h_ref, w_ref, cfg: _Cfg):
  """-> [N, 3] (kl, lse_p, lse_q)."""
  def init(rows):
    st = _tiles.init_stats(rows)
    return _Acc(st.m, st.l, st.m, st.l, st.l)

  def fold(acc, z, cols, col_ok, rows, _):
    del cols, rows
    s_p = _tiles.scale_logits(z[0], cfg.scaling)
    s_q = _tiles.scale_logits(z[1], cfg.scaling)
    m_p, scale_p, _, e_p = _tiles.online_max(acc.m_p, s_p, col_ok)
    m_q, scale_q, _, e_q = _tiles.online_max(acc.m_q, s_q, col_ok)
    l_p = acc.l_p * scale_p + jnp.sum(e_p, axis=1, keepdims=True)
    l_q = acc.l_q * scale_q + jnp.sum(e_q, axis=1, keepdims=True)
    # u weights the log-ratio: q for forward KL, p for reverse.
    e_u, scale_u, diff = ((e_p, scale_p, s_p - s_q) if cfg.reverse else
                          (e_q, scale_q, s_q - s_p))
    term = jnp.sum(e_u * jnp.where(col_ok, diff, 0.0), axis=1, keepdims=True)
    return _Acc(m_p, l_p, m_q, l_q, acc.cross * scale_u + term)

  def finish(acc, rows):
    del rows
    lse_p = acc.m_p + jnp.log(acc.l_p)
    lse_q = acc.m_q + jnp.log(acc.l_q)
    if cfg.reverse:
      kl = acc.cross / acc.l_p - lse_p + lse_q
    else:
      kl = acc.cross / acc.l_q - lse_q + lse_p
    return (jnp.concatenate([kl, lse_p, lse_q], axis=1),)

  (out,) = _xla.forward(((h, w), (h_ref, w_ref)), (), init, fold, finish,
                        block_n=cfg.block_n, block_v=cfg.block_v)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kl(h, w, h_ref, w_ref, cfg):
  return _forward(h, w, h_ref, w_ref, cfg)[:, 0]


def _kl_fwd(h, w, h_ref, w_ref, cfg):
  out = _forward(h, w, h_ref, w_ref, cfg)
  return out[:, 0], (h, w, h_ref, w_ref, out)


def _kl_bwd(cfg, res, g_kl):
  h, w, h_ref, w_ref, out = res
  rows = jnp.concatenate([g_kl[:, None], out], axis=1)  # g, kl, lse_p, lse_q

  def grad(z, cols, ok, rows):
    del cols
    g, kl, lse_p, lse_q = (rows[0][:, k:k + 1] for k in range(4))
    s_p = _tiles.scale_logits(z[0], cfg.scaling)
    logp = jnp.where(ok, s_p - lse_p, _tiles.NEG)
    p = jnp.exp(logp)
    logq = jnp.where(ok, _tiles.scale_logits(z[1], cfg.scaling) - lse_q,
                     _tiles.NEG)
    if cfg.reverse:
      g_s = g * p * jnp.where(ok, logp - logq - kl, 0.0)
    else:
      g_s = g * (p - jnp.exp(logq))
    return _tiles.unscale_grad(jnp.where(ok, g_s, 0.0), s_p, cfg.scaling)

  dh, dw = _xla.backward(((h, w), (h_ref, w_ref)), (rows,), grad,
                         block_n=cfg.block_n, block_v=cfg.block_v)
  return dh, dw, None, None  # the reference is a constant


_kl.defvjp(_kl_fwd, _kl_bwd)
