"""Token-level SFT losses."""
from __future__ import annotations

import jax.numpy as jnp

from tunejax import kernels
from tunejax.losses.base import Head, register


def _flat_stats(policy: Head, targets_BxL, **kw):
  b, l, d = policy.h_BxLxD.shape
  return kernels.token_stats(
      policy.h_BxLxD.reshape(b * l, d), policy.w_DxV,
      targets_BxL.reshape(b * l), softcap=policy.softcap, **kw)


def token_weights(batch) -> jnp.ndarray:
  """Per-target weight: loss_mask times optional data-provided weights."""
  w = batch["loss_mask"].astype(jnp.float32)
  if "weights" in batch:
    w = w * batch["weights"].astype(jnp.float32)
  return w


@register("xent")
def cross_entropy(policy: Head, batch, *, ref: Head | None = None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Masked next-token cross-entropy, summed over weighted target tokens.

  loss_t = -(1-ε)·log p(y_t) - ε·mean_v log p(v) + z·lse_t²   (per target t)
  The denominator is the number of trained targets (sum of the loss mask),
  so accumulation over micro-batches and hosts is exactly token-weighted.
  """
  del ref
  w_N = token_weights(batch).reshape(-1)
  stats = _flat_stats(policy, batch["targets"],
                      label_smoothing=label_smoothing)
  nll_N = -stats.logp
  loss_N = nll_N
  if label_smoothing:
    loss_N = (1.0 - label_smoothing) * nll_N - label_smoothing * stats.smooth
  if z_loss:
    loss_N = loss_N + z_loss * jnp.square(stats.lse)
  denom = jnp.sum(batch["loss_mask"].astype(jnp.float32))
  aux = {"nll_sum": jnp.sum(w_N * nll_N), "ntokens": denom}
  return jnp.sum(w_N * loss_N), denom, aux
