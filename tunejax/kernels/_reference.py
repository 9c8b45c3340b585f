"""Naive implementations that materialise `[N, V]` logits.

They are the specification the fused op is tested against and the baseline
of bench/token_loss.py; gradients come from plain JAX autodiff.
"""
import jax
import jax.numpy as jnp

from tunejax.kernels import _tiles


def scaled_logits(h_NxD, w_DxV, sc: _tiles.Scaling):
  return _tiles.scale_logits(_tiles.matmul(h_NxD, w_DxV), sc)


def token_stats(h_NxD, w_DxV, y_N, sc: _tiles.Scaling):
  """-> (logp, lse, entropy, smooth) per token; y < 0 means ignored."""
  s_NxV = scaled_logits(h_NxD, w_DxV, sc)
  lse_N = jax.nn.logsumexp(s_NxV, axis=-1)
  logp_NxV = s_NxV - lse_N[:, None]
  tgt_N = jnp.take_along_axis(
      logp_NxV, jnp.maximum(y_N, 0)[:, None], axis=-1)[:, 0]
  logp_N = jnp.where(y_N < 0, 0.0, tgt_N)
  entropy_N = -jnp.sum(jnp.exp(logp_NxV) * logp_NxV, axis=-1)
  return logp_N, lse_N, entropy_N, jnp.mean(logp_NxV, axis=-1)


def token_kl(h_NxD, w_DxV, h_ref_NxD, w_ref_DxV, reverse, sc):
  """Per-token KL(p_ref || p) (or KL(p || p_ref) when `reverse`)."""
  logp_NxV = jax.nn.log_softmax(scaled_logits(h_NxD, w_DxV, sc), axis=-1)
  logq_NxV = jax.nn.log_softmax(
      scaled_logits(h_ref_NxD, w_ref_DxV, sc), axis=-1)
  if reverse:
    logp_NxV, logq_NxV = logq_NxV, logp_NxV
  return jnp.sum(jnp.exp(logq_NxV) * (logq_NxV - logp_NxV), axis=-1)
