"""Preference losses over chosen/rejected pairs: the DPO family and friends.

Batch layout. A preference batch (data format 'preference') has every row
key twice, `chosen_*` and `rejected_*` (`tokens`, `targets`, `loss_mask`,
`segment_ids`, `positions`); segment k of chosen row i pairs with segment k
of rejected row i, so packed rows carry several pairs. The model runs once
over both sides: `model_inputs` interleaves them into `[2B, L]` rows
(chosen i at 2i, rejected i at 2i+1 — each device keeps its own rows under
data sharding), and the losses split the policy `Head` the same way.

Per pair, with ℓ the per-token log-probs of the response targets:
  logp(y) = Σ_t ℓ_t,  Δ = logp_θ(y) − logp_ref(y),  u = Δ_w − Δ_l.
Reference log-probs come from the `ref` Head (online: the frozen base in
the same step) or, when the batch carries `chosen_ref_logp` /
`rejected_ref_logp` per-token arrays, from those (precomputed once over the
dataset: `tunejax.train.preference`).

Every loss returns `(Σ_pairs loss, number of pairs, aux)`; the step divides
once, so accumulation is exactly pair-weighted. Aux `*_sum` entries become
per-pair means: rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy, logps/chosen, logps/rejected, and kl (exact sequential
KL, `kl_metric`). Token-level objectives (TDPO, T-REG, token-wise rewards)
are in `token_pref`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from tunejax import errors, kernels
from tunejax.losses.base import Head, register
from tunejax.losses.sft import flat_h, target_stats

SIDES = ("chosen", "rejected")
ROW_KEYS = ("tokens", "positions", "segment_ids")


def is_preference(batch) -> bool:
  return "chosen_tokens" in batch


def interleave(c_BxL, r_BxL):
  """[B, ...] chosen and rejected -> [2B, ...], rows c0, r0, c1, r1, ..."""
  return jnp.stack([c_BxL, r_BxL], axis=1).reshape(
      2 * c_BxL.shape[0], *c_BxL.shape[1:])


def deinterleave(x_2BxL):
  """Inverse of `interleave`: -> (chosen [B, ...], rejected [B, ...])."""
  x = x_2BxL.reshape(x_2BxL.shape[0] // 2, 2, *x_2BxL.shape[1:])
  return x[:, 0], x[:, 1]


def model_inputs(batch):
  """(tokens, positions, segment_ids) the model runs on.

  LM batches pass through; preference batches become interleaved `[2B, L]`
  rows so one forward serves both sides of every pair.
  """
  if not is_preference(batch):
    return tuple(batch[k] for k in ROW_KEYS)
  return tuple(interleave(batch[f"chosen_{k}"], batch[f"rejected_{k}"])
               for k in ROW_KEYS)


def both_sides(batch, key):
  return interleave(batch[f"chosen_{key}"], batch[f"rejected_{key}"])


def token_logps(head: Head, batch, *, impl: str = "auto"):
  """Per-token log-probs of the response targets, (chosen, rejected) [B, L].

  Untrained positions (prompt, padding) are 0. Reuses the SFT loss's
  `target_stats`, i.e. the fused token op (no `[N, V]` logits).
  """
  flat = {"targets": both_sides(batch, "targets"),
          "loss_mask": both_sides(batch, "loss_mask")}
  logp = target_stats(head, flat, impl=impl).logp
  return deinterleave(logp.reshape(flat["targets"].shape))


def ref_token_logps(ref: Optional[Head], batch, name: str, *,
                    impl: str = "auto"):
  """Reference per-token log-probs: precomputed batch keys, else `ref`."""
  if "chosen_ref_logp" in batch:
    return batch["chosen_ref_logp"], batch["rejected_ref_logp"]
  if ref is None:
    raise errors.ConfigError(
        f"config.loss.name={name!r} needs reference log-probs: the online "
        "reference head (loss.reference='online', an adapter peft.method) "
        "or precomputed ones (loss.reference='precomputed')")
  return jax.lax.stop_gradient(token_logps(ref, batch, impl=impl))


def pair_sums(x_BxL, segment_ids_BxL):
  """Per-pair sums of a per-token array: [B, L] -> [B * (L + 1)].

  Slot `i * (L + 1) + k` holds segment k of row i (k = 0 is padding; a
  segment id never exceeds L), identical for chosen and rejected rows.
  """
  b, l = x_BxL.shape
  slot = jnp.arange(b)[:, None] * (l + 1) + segment_ids_BxL
  return jax.ops.segment_sum(x_BxL.reshape(-1), slot.reshape(-1),
                             num_segments=b * (l + 1))


class Pairs(NamedTuple):
  """Per-pair quantities, all [P] (P = B * (L + 1) slots, most invalid)."""
  logp_w: jax.Array      # Σ_t ℓ_t of the chosen response, policy
  logp_l: jax.Array
  ref_w: jax.Array       # the same under the reference (0 without one)
  ref_l: jax.Array
  len_w: jax.Array       # number of response targets
  len_l: jax.Array
  valid: jax.Array       # float 0/1: both sides have response targets


def pairs(batch, tok_w, tok_l, ref_w=None, ref_l=None) -> Pairs:
  """Sums per-token arrays (chosen/rejected [B, L]) into `Pairs`."""
  seg_w, seg_l = batch["chosen_segment_ids"], batch["rejected_segment_ids"]
  m_w = batch["chosen_loss_mask"].astype(jnp.float32)
  m_l = batch["rejected_loss_mask"].astype(jnp.float32)
  len_w, len_l = pair_sums(m_w, seg_w), pair_sums(m_l, seg_l)
  zeros = jnp.zeros_like(len_w)
  sum_w = lambda x: zeros if x is None else pair_sums(x * m_w, seg_w)
  sum_l = lambda x: zeros if x is None else pair_sums(x * m_l, seg_l)
  valid = ((len_w > 0) & (len_l > 0)).astype(jnp.float32)
  return Pairs(sum_w(tok_w), sum_l(tok_l), sum_w(ref_w), sum_l(ref_l),
               len_w, len_l, valid)


# ---------------------------------------------------------------------------
# Per-pair objectives (pure functions of per-pair arrays; tested against
# TRL's formulas).

DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _smoothed_sigmoid(z, eps):
  """−(1−ε)·log σ(z) − ε·log σ(−z): DPO (ε=0) / conservative DPO (ε>0)."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo_objective(p: Pairs, *, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0):
  """Per-pair DPO-family loss [P].

  With Δ = Δ_w − Δ_l (TRL `trl/trainer/dpo_trainer.py::_compute_loss`):
    sigmoid  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)   (ε > 0: conservative DPO,
             Mitchell 2023 "A note on DPO with noisy preferences"; TRL 1.16
             keeps this form in its 'aot'/CPO losses, plain sigmoid is ε=0)
    hinge    max(0, 1 − βΔ)                        (SLiC)
    ipo      (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²     (Azar et al. eq. 17, with
             TRL's length normalisation confirmed by the IPO authors)
    robust   [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)   (rDPO, Chowdhury
             et al. 2024)
  """
  d_w, d_l = p.logp_w - p.ref_w, p.logp_l - p.ref_l
  z = beta * (d_w - d_l)
  if loss_type == "sigmoid":
    return _smoothed_sigmoid(z, label_smoothing)
  if loss_type == "hinge":
    return jax.nn.relu(1.0 - z)
  if loss_type == "ipo":
    u = d_w / jnp.maximum(p.len_w, 1.0) - d_l / jnp.maximum(p.len_l, 1.0)
    return jnp.square(u - 1.0 / (2.0 * beta))
  if loss_type == "robust":
    eps = label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z)
            + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
  raise errors.ConfigError(f"config.loss.options.loss_type={loss_type!r}: "
                           f"expected one of {DPO_TYPES}")


def simpo_objective(p: Pairs, *, beta: float, gamma: float,
                    label_smoothing: float = 0.0):
  """SimPO (Meng et al. 2024, eq. 6): −log σ(β·(ā_w − ā_l) − γ), ā the
  length-normalised log-prob; no reference. TRL CPOTrainer loss_type
  'simpo' (γ = `simpo_gamma`, label smoothing as in cDPO)."""
  a_w = p.logp_w / jnp.maximum(p.len_w, 1.0)
  a_l = p.logp_l / jnp.maximum(p.len_l, 1.0)
  return _smoothed_sigmoid(beta * (a_w - a_l) - gamma, label_smoothing)


def log1mexp(x):
  """log(1 − eˣ) for x < 0, stable on both sides of −log 2."""
  return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)),
                   jnp.log(-jnp.expm1(x)))


def orpo_log_odds(p: Pairs):
  """log odds(y_w) − log odds(y_l) on length-normalised log-probs (ORPO
  eqs. 4 and 7; TRL ORPOTrainer.odds_ratio_loss)."""
  a_w = p.logp_w / jnp.maximum(p.len_w, 1.0)
  a_l = p.logp_l / jnp.maximum(p.len_l, 1.0)
  # Mean log-probs are < 0; the clamp keeps padded slots finite.
  a_w, a_l = jnp.minimum(a_w, -1e-6), jnp.minimum(a_l, -1e-6)
  return (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))


# ---------------------------------------------------------------------------
# Registered losses.


def pair_metrics(p: Pairs, r_w, r_l, kl_sum=None):
  """Aux sums over valid pairs (the step divides by the number of pairs)."""
  v = p.valid
  out = {"rewards/chosen_sum": jnp.sum(v * r_w),
         "rewards/rejected_sum": jnp.sum(v * r_l),
         "rewards/margin_sum": jnp.sum(v * (r_w - r_l)),
         "rewards/accuracy_sum": jnp.sum(v * (r_w > r_l)),
         "logps/chosen_sum": jnp.sum(v * p.logp_w),
         "logps/rejected_sum": jnp.sum(v * p.logp_l)}
  if kl_sum is not None:
    out["kl_sum"] = kl_sum
  return jax.tree.map(jax.lax.stop_gradient, out)


def sequential_kl(policy: Head, ref: Head, batch, *, impl: str = "auto"):
  """Per-token full-vocabulary KL(π_ref ‖ π_θ) on response targets,
  (chosen, rejected) [B, L], via the fused `kernels.token_kl`."""
  kl = kernels.token_kl(flat_h(policy), policy.w_DxV, flat_h(ref), ref.w_DxV,
                        direction="forward", softcap=policy.softcap,
                        impl="naive" if impl == "naive" else "auto")
  mask = both_sides(batch, "loss_mask").astype(jnp.float32)
  return deinterleave(kl.reshape(mask.shape) * mask)


def kl_metric_sum(policy: Head, ref: Head | None, batch, valid_pairs,
                  impl: str):
  """Σ over pairs of the mean of both responses' sequential KL (exact,
  full vocabulary; forward only), or None without an online reference."""
  if ref is None:
    return None
  sg = lambda hd: jax.tree.map(jax.lax.stop_gradient, hd)
  kl_tw, kl_tl = sequential_kl(sg(policy), sg(ref), batch, impl=impl)
  kl_w = pair_sums(kl_tw, batch["chosen_segment_ids"])
  kl_l = pair_sums(kl_tl, batch["rejected_segment_ids"])
  return 0.5 * jnp.sum(valid_pairs * (kl_w + kl_l))


def pairs_with_ref(policy, batch, ref, name, impl):
  tok_w, tok_l = token_logps(policy, batch, impl=impl)
  ref_w, ref_l = ref_token_logps(ref, batch, name, impl=impl)
  return pairs(batch, tok_w, tok_l, ref_w, ref_l), (tok_w, tok_l, ref_w,
                                                    ref_l)


def reduce_pairs(p: Pairs, per_pair, aux):
  return jnp.sum(p.valid * per_pair), jnp.sum(p.valid), aux


@register("dpo", needs_ref=True)
def dpo(policy: Head, batch, *, ref: Head | None = None, beta: float = 0.1,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        kl_metric: bool = False, impl: str = "auto"):
  """DPO (Rafailov et al. 2023) and its TRL loss types (`dpo_objective`).

  Options: beta; loss_type sigmoid | hinge | ipo | robust;
  label_smoothing ε (sigmoid: conservative DPO; robust: rDPO).
  Rewards are β·Δ (TRL's implicit rewards). `kl_metric` logs `kl`, the
  exact full-vocabulary KL(π_ref‖π_θ) per response (one more forward
  pass over the vocabulary; online reference only).
  """
  p, _ = pairs_with_ref(policy, batch, ref, "dpo", impl)
  per_pair = dpo_objective(p, beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing)
  r_w, r_l = beta * (p.logp_w - p.ref_w), beta * (p.logp_l - p.ref_l)
  kl = kl_metric_sum(policy, ref, batch, p.valid, impl) if kl_metric \
      else None
  return reduce_pairs(p, per_pair, pair_metrics(p, r_w, r_l, kl))


@register("simpo")
def simpo(policy: Head, batch, *, ref: Head | None = None, beta: float = 2.0,
          gamma: float = 0.5, label_smoothing: float = 0.0,
          impl: str = "auto"):
  """SimPO: length-normalised, target margin γ, no reference model.

  Defaults β = 2.0, γ = 0.5 (TRL CPOConfig, SimPO paper's Mistral setting
  uses β 2.0-2.5 with γ/β 0.5). Rewards are β·ā.
  """
  del ref
  tok_w, tok_l = token_logps(policy, batch, impl=impl)
  p = pairs(batch, tok_w, tok_l)
  per_pair = simpo_objective(p, beta=beta, gamma=gamma,
                             label_smoothing=label_smoothing)
  r_w = beta * p.logp_w / jnp.maximum(p.len_w, 1.0)
  r_l = beta * p.logp_l / jnp.maximum(p.len_l, 1.0)
  return reduce_pairs(p, per_pair, pair_metrics(p, r_w, r_l))


@register("orpo")
def orpo(policy: Head, batch, *, ref: Head | None = None, beta: float = 0.1,
         impl: str = "auto"):
  """ORPO (Hong et al. 2024): NLL of the chosen response − λ·log σ(log OR).

  λ = `beta` (TRL's name, default 0.1). The NLL term is the chosen
  response's mean token NLL per pair (the paper's per-example L_SFT; TRL
  averages over all chosen tokens of the batch, equal for equal lengths),
  so the pair-weighted division of the step stays exact. Rewards are
  β·ā (TRL); aux also has `nll` and `log_odds`.
  """
  del ref
  tok_w, tok_l = token_logps(policy, batch, impl=impl)
  p = pairs(batch, tok_w, tok_l)
  log_odds = orpo_log_odds(p)
  nll = -p.logp_w / jnp.maximum(p.len_w, 1.0)
  per_pair = nll - beta * jax.nn.log_sigmoid(log_odds)
  r_w = beta * p.logp_w / jnp.maximum(p.len_w, 1.0)
  r_l = beta * p.logp_l / jnp.maximum(p.len_l, 1.0)
  aux = pair_metrics(p, r_w, r_l)
  aux["nll_sum"] = jax.lax.stop_gradient(jnp.sum(p.valid * nll))
  aux["log_odds_sum"] = jax.lax.stop_gradient(jnp.sum(p.valid * log_odds))
  return reduce_pairs(p, per_pair, aux)
