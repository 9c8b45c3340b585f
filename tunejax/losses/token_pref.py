"""Token-level preference objectives: TDPO's sequential KL, T-REG's
token-reward regulariser, and token-wise DPO rewards for dense-reward RL.

Batch layout, pairs and metrics as in `tunejax.losses.preference`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from tunejax import errors
from tunejax.losses.base import Head, register
from tunejax.losses.preference import (Pairs, dpo_objective, kl_metric_sum,
                                       pair_metrics, pair_sums,
                                       pairs_with_ref, reduce_pairs,
                                       sequential_kl)


def tdpo_objective(p: Pairs, kl_w, kl_l, *, beta: float, alpha: float,
                   variant: int):
  """TDPO (Zeng et al., ICML 2024; official `trainers.py::tdpo_loss`):
    TDPO1  −log σ(β·[u − (D_l − D_w)])
    TDPO2  −log σ(β·[u − α·(D_l − sg(D_w))])
  D = Σ_t KL(π_ref(·|s_t) ‖ π_θ(·|s_t)), the sequential KL of a response.
  """
  u = (p.logp_w - p.ref_w) - (p.logp_l - p.ref_l)
  if variant == 1:
    z = u - (kl_l - kl_w)
  elif variant == 2:
    z = u - alpha * (kl_l - jax.lax.stop_gradient(kl_w))
  else:
    raise errors.ConfigError(
        f"config.loss.options.variant={variant!r}: expected 1 or 2")
  return -jax.nn.log_sigmoid(beta * z)


REWARD_FORMS = ("sigmoid", "diff")


def contrastive_token_rewards(logp_better, logp_worse, *,
                              form: str = "sigmoid"):
  """T-REG token rewards r̂_t = σ(ℓ_t(x_better) − ℓ_t(x_worse)) − 0.5.

  ℓ are the evaluator's (the reference model's) log-probs of the same
  response tokens under the two contrastive prompts (Zhou et al., ACL 2025,
  arXiv 2412.02685; reference/verified-formulas.md §8, SECONDARY).
  `form='diff'` gives the raw contrast ℓ_t(x_better) − ℓ_t(x_worse)
  (unbounded; the paper's squashed form is the default).
  """
  if form == "diff":
    return logp_better - logp_worse
  if form != "sigmoid":
    raise errors.ConfigError(f"T-REG reward form {form!r}: expected one of "
                             f"{REWARD_FORMS}")
  return jax.nn.sigmoid(logp_better - logp_worse) - 0.5


def token_rewards(logp_policy, logp_ref, mask, *, beta: float = 0.1,
                  clip: Optional[float] = None):
  """Token-wise DPO rewards β·(log π_θ(y_t) − log π_ref(y_t)), masked.

  For RL with dense rewards (RTO, Zhong et al. arXiv 2404.18922: a DPO
  policy's per-token log-ratio scaled by β1 then clipped to ±c, defaults
  β1 = c = 0.05). Inputs are per-token arrays (e.g. from `token_logps`,
  or `target_stats(head, batch).logp` on an LM batch); `clip` None = no
  clip. Returns the same shape, 0 where `mask` is 0.
  """
  r = beta * (logp_policy - logp_ref)
  if clip is not None:
    r = jnp.clip(r, -clip, clip)
  return r * mask


@register("tdpo", needs_ref=True)
def tdpo(policy: Head, batch, *, ref: Head | None = None, beta: float = 0.1,
         alpha: float = 0.5, variant: int = 2, impl: str = "auto"):
  """Token-level DPO with the sequential KL (`tdpo_objective`).

  Defaults from the official `config/loss/tdpo.yaml`: β = 0.1, α = 0.5;
  `variant` 1 or 2 (the function default there is TDPO2). Needs the online
  reference (full-vocabulary distributions). Rewards are β·(Δ + D) as in
  the official code; `kl` is the mean of D over both responses.
  """
  if ref is None:
    raise errors.ConfigError(
        "config.loss.name='tdpo' needs the online reference head (full-"
        "vocabulary KL): loss.reference='online' with an adapter peft.method")
  p, _ = pairs_with_ref(policy, batch, ref, "tdpo", impl)
  kl_tw, kl_tl = sequential_kl(policy, ref, batch, impl=impl)
  kl_w = pair_sums(kl_tw, batch["chosen_segment_ids"])
  kl_l = pair_sums(kl_tl, batch["rejected_segment_ids"])
  per_pair = tdpo_objective(p, kl_w, kl_l, beta=beta, alpha=alpha,
                            variant=variant)
  r_w = beta * (p.logp_w - p.ref_w + kl_w)
  r_l = beta * (p.logp_l - p.ref_l + kl_l)
  return reduce_pairs(p, per_pair, pair_metrics(
      p, r_w, r_l, 0.5 * jnp.sum(p.valid * (kl_w + kl_l))))


REG_NORMS = ("sum", "mean")


@register("treg", needs_ref=True)
def treg(policy: Head, batch, *, ref: Head | None = None, beta: float = 0.1,
         alpha: float = 0.25, reg_norm: str = "sum", kl_metric: bool = False,
         impl: str = "auto"):
  """T-REG: DPO plus token-level reward regularisation.

  L = L_DPO + α·w·(L_REG(y_w) + L_REG(y_l)),
  L_REG(y) = −Σ_t β·r̂_t·log π_θ(y_t | s_t),
  w = sg(σ(r_DPO(y_l) − r_DPO(y_w))), r_DPO = β·Δ
  (Zhou et al., ACL 2025; reference/verified-formulas.md §8: SECONDARY).
  r̂_t ∈ [−0.5, 0.5] are self-generated token rewards from contrastive
  prompting of the reference (`contrastive_token_rewards`), given per token
  as batch keys `chosen_token_rewards` / `rejected_token_rewards`.
  Options: alpha ∈ {0.1, 0.25, 0.5} in the paper; reg_norm 'sum' (token sum,
  the formula) or 'mean' (per-response token mean) — the paper's choice is
  unconfirmed, so both are exposed. `kl_metric` as in `dpo`.
  """
  if "chosen_token_rewards" not in batch:
    raise errors.DataError(
        "loss 'treg' needs per-token rewards in the batch "
        "(chosen_token_rewards / rejected_token_rewards)")
  if reg_norm not in REG_NORMS:
    raise errors.ConfigError(f"config.loss.options.reg_norm={reg_norm!r}: "
                             f"expected one of {REG_NORMS}")
  p, toks = pairs_with_ref(policy, batch, ref, "treg", impl)
  tok_w, tok_l = toks[0], toks[1]
  reg_w = pair_sums(-beta * batch["chosen_token_rewards"] * tok_w
                    * batch["chosen_loss_mask"], batch["chosen_segment_ids"])
  reg_l = pair_sums(-beta * batch["rejected_token_rewards"] * tok_l
                    * batch["rejected_loss_mask"],
                    batch["rejected_segment_ids"])
  if reg_norm == "mean":
    reg_w = reg_w / jnp.maximum(p.len_w, 1.0)
    reg_l = reg_l / jnp.maximum(p.len_l, 1.0)
  r_w, r_l = beta * (p.logp_w - p.ref_w), beta * (p.logp_l - p.ref_l)
  w = jax.lax.stop_gradient(jax.nn.sigmoid(r_l - r_w))
  per_pair = (dpo_objective(p, beta=beta) + alpha * w * (reg_w + reg_l))
  aux = pair_metrics(p, r_w, r_l, kl_metric_sum(policy, ref, batch, p.valid,
                                                impl) if kl_metric else None)
  aux["reg_sum"] = jax.lax.stop_gradient(jnp.sum(p.valid * (reg_w + reg_l)))
  return reduce_pairs(p, per_pair, aux)
