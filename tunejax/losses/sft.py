"""Token-level SFT losses."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tunejax import kernels
from tunejax.losses.base import Head, register


def token_weights(batch) -> jnp.ndarray:
  """Per-target weight: loss_mask times optional data-provided weights."""
  w = batch["loss_mask"].astype(jnp.float32)
  if "weights" in batch:
    w = w * batch["weights"].astype(jnp.float32)
  return w


def _xent_sums(h_NxD, w_DxV, targets_N, wt_N, *, softcap, label_smoothing,
               z_loss, impl):
  """(weighted loss sum, weighted nll sum) over N tokens."""
  stats = kernels.token_stats(h_NxD, w_DxV, targets_N, softcap=softcap,
                              label_smoothing=label_smoothing, impl=impl)
  nll_N = -stats.logp
  loss_N = nll_N
  if label_smoothing:
    loss_N = (1.0 - label_smoothing) * nll_N - label_smoothing * stats.smooth
  if z_loss:
    loss_N = loss_N + z_loss * jnp.square(stats.lse)
  return jnp.sum(wt_N * loss_N), jnp.sum(wt_N * nll_N)


@register("xent")
def cross_entropy(policy: Head, batch, *, ref: Head | None = None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  target_capacity: float = 1.0, impl: str = "auto"):
  """Masked next-token cross-entropy, summed over weighted target tokens.

  loss_t = -(1-ε)·log p(y_t) - ε·mean_v log p(v) + z·lse_t²   (per target t)
  The denominator is the number of trained targets (sum of the loss mask),
  so accumulation over micro-batches and hosts is exactly token-weighted.

  `target_capacity` < 1 runs the unembedding only on trained positions: the
  first ⌈capacity·N⌉ of them are gathered (prompt tokens of completion-only
  SFT never reach the 262k-wide head). If a batch has more trained
  positions than that, an exact full pass is taken instead (`lax.cond`), so
  the result never depends on the capacity — only the speed does.
  """
  del ref
  b, l, d = policy.h_BxLxD.shape
  h_NxD = policy.h_BxLxD.reshape(b * l, d)
  y_N = batch["targets"].reshape(-1)
  wt_N = token_weights(batch).reshape(-1)
  trained_N = batch["loss_mask"].reshape(-1) > 0
  sums = lambda h, y, wt: _xent_sums(
      h, policy.w_DxV, jnp.where(wt != 0, y, -1), wt, softcap=policy.softcap,
      label_smoothing=label_smoothing, z_loss=z_loss, impl=impl)
  cap = min(b * l, 8 * math.ceil(target_capacity * b * l / 8))
  if cap >= b * l:
    loss_sum, nll_sum = sums(h_NxD, y_N, wt_N)
  else:
    # Trained positions first (stable), then padding up to the capacity.
    idx = jnp.argsort(~trained_N, stable=True)[:cap]
    loss_sum, nll_sum = jax.lax.cond(
        jnp.sum(trained_N) <= cap,
        lambda: sums(h_NxD[idx], y_N[idx], jnp.where(trained_N[idx],
                                                      wt_N[idx], 0.0)),
        lambda: sums(h_NxD, y_N, wt_N))
  denom = jnp.sum(batch["loss_mask"].astype(jnp.float32))
  return loss_sum, denom, {"nll_sum": nll_sum, "ntokens": denom}
