"""One-Token Rollout: token-level policy gradient on SFT data.

"One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy
Gradient" (ICLR 2026 submission; the structure is from the paper and its
OpenReview thread, no official code; reference/verified-formulas.md §2).
Each trained position t is a one-step episode from the gold prefix s_t:

  a_{t,1..K} ~ π'(·|s_t) = softmax(z_t / τ)         (detached, τ > 1)
  R(a) = 1 if a = y_t else β                         (constants)
  L = -(1/T) Σ_t (1/K) Σ_k R(a_{t,k})·log π_θ(a_{t,k}|s_t)

REINFORCE on the untempered policy; β (small negative in the paper's
ablation) is the baseline/penalty, there is no other baseline. The
candidates come from the fused Gumbel-top-k sampler; their log-probs with
gradients are `z[a] - lse`, with `lse` from the fused token op and the K
candidate logits gathered row-block by row-block (rematerialised in the
backward), so `[N, V]` logits never exist.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tunejax import errors, kernels
from tunejax.losses.base import Head, register
from tunejax.losses.sft import (flat_h, loss_rng, n_targets, target_stats,
                                token_weights)


def candidate_logits(h_NxD, w_DxV, ids_NxK, *, softcap=None,
                     block_n: int = 256):
  """softcap(h_n · w[:, ids_nk]) for K ids per row, differentiable.

  Rows are processed in blocks under `jax.checkpoint`, so memory holds one
  block's gathered `[block_n, K, D]` columns at a time, forward and back.
  """
  n, d = h_NxD.shape
  k = ids_NxK.shape[1]
  bn = min(block_n, n)
  pad = -n % bn
  h = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(-1, bn, d)
  ids = jnp.pad(ids_NxK, ((0, pad), (0, 0))).reshape(-1, bn, k)

  @jax.checkpoint
  def block(w, h_bxD, ids_bxK):
    w_Dxbxk = jnp.take(w, ids_bxK, axis=1)
    z = jnp.einsum("nd,dnk->nk", h_bxD, w_Dxbxk,
                   preferred_element_type=jnp.float32)
    if softcap:
      z = softcap * jnp.tanh(z / softcap)
    return z

  z = jax.lax.map(lambda xs: block(w_DxV, *xs), (h, ids))
  return z.reshape(-1, k)[:n]


def sample_with_replacement(h_NxD, w_DxV, rng, k, *, temperature, softcap):
  """K independent single draws (Gumbel-max) per row: one vocabulary pass
  per draw, so K passes; the default without-replacement path takes one."""
  def one(key):
    ids, _ = kernels.sample_candidates(h_NxD, w_DxV, key, 1,
                                       temperature=temperature,
                                       softcap=softcap)
    return ids[:, 0]
  return jax.lax.map(one, jax.random.split(rng, k)).T


@register("otr")
def one_token_rollout(policy: Head, batch, *, ref: Head | None = None,
                      num_samples: int = 256, temperature: float = 1.5,
                      beta: float = -0.1, replacement: bool = False,
                      seed: int = 0, impl: str = "auto"):
  """One-Token Rollout loss (see the module docstring for the form).

  Options (the paper's exact β and τ are not public; K = 256 is):
    num_samples: K candidates per position.
    temperature: τ of the detached sampling distribution (τ > 1 explores).
    beta: reward of a candidate that is not the gold token (β < 1).
    replacement: False draws K distinct tokens with Gumbel-top-k in one
      fused pass; True draws K independent samples (K passes; the unbiased
      Monte-Carlo form of the expectation).
    seed: stream of the sampling key (the step's key when the train step
      provides `batch['rng']`, else derived from the batch tokens).

  Reduction: per-token mean over trained targets (weights from the data
  scale each position's term).
  """
  del ref
  if num_samples < 1 or num_samples > policy.w_DxV.shape[1]:
    raise errors.ConfigError(
        f"config.loss.options.num_samples={num_samples}: expected 1..V")
  h_NxD = flat_h(policy)
  stats = target_stats(policy, batch, impl=impl)
  # lse of the untempered policy; differentiable through the fused op.
  lse = stats.lse
  rng = loss_rng(batch, seed)
  if replacement:
    ids = sample_with_replacement(h_NxD, policy.w_DxV, rng, num_samples,
                                  temperature=temperature,
                                  softcap=policy.softcap)
  else:
    ids, _ = kernels.sample_candidates(h_NxD, policy.w_DxV, rng, num_samples,
                                       temperature=temperature,
                                       softcap=policy.softcap)
  z = candidate_logits(h_NxD, policy.w_DxV, ids, softcap=policy.softcap)
  logp_cand = z - lse[:, None]
  y = batch["targets"].reshape(-1)
  reward = jnp.where(ids == y[:, None], 1.0, beta)
  per_token = -jnp.mean(reward * logp_cand, axis=1)
  wt = token_weights(batch).reshape(-1)
  hit = jnp.any(ids == y[:, None], axis=1).astype(jnp.float32)
  return jnp.sum(wt * per_token), n_targets(batch), {
      "nll_sum": jnp.sum(wt * -stats.logp), "gold_sampled_sum": jnp.sum(
          wt * hit)}
