"""Token selection: train only on the top ρ of targets by a score.

Rho-1 ("rho1"): excess loss against a reference model, top ρ per batch.
ssToken ("sstoken"): retrospective excess loss against a history model,
min-max normalised per sample and mixed with an attention importance,
top ⌈ρ·n⌉ per sample.

Selection is exact and static-shaped: candidates are sorted by (group,
score desc, position) and a target is kept when its rank inside its group
is below ⌈ρ·n_group⌉, so exactly that many are kept (ties go to the earlier
position).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tunejax import errors
from tunejax.losses.base import Head, register
from tunejax.losses.sft import target_stats, token_weights

# 'ema' / 'snapshot': the train state keeps a history model
# (tunejax.train.history) and the step passes it as the reference head.
HISTORIES = ("ref", "batch", "ema", "snapshot")


def select_top(score_N, valid_N, group_N, ratio: float):
  """Float mask keeping the top ⌈ratio·n_g⌉ valid entries of each group.

  Args:
    score_N: float scores (higher = keep first).
    valid_N: bool, entries that may be selected (n_g counts these).
    group_N: int32 group ids in [0, N) (one id = select over everything).
    ratio: fraction ρ in (0, 1].
  """
  n = score_N.shape[0]
  score = jnp.where(valid_N, score_N, -jnp.inf)
  pos = jnp.arange(n)
  # lexsort: last key is primary.
  order = jnp.lexsort((pos, -score, group_N))
  g_sorted = group_N[order]
  rank_sorted = pos - jnp.searchsorted(g_sorted, g_sorted, side="left")
  rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  count = jax.ops.segment_sum(valid_N.astype(jnp.int32), group_N,
                              num_segments=n)
  # ⌈ρ·n⌉ in float32; the epsilon keeps exact products (0.5·8) from
  # rounding up.
  k = jnp.ceil(ratio * count.astype(jnp.float32) - 1e-4).astype(jnp.int32)
  return (valid_N & (rank < k[group_N])).astype(jnp.float32)


def sample_groups(batch) -> jnp.ndarray:
  """One group id per (row, segment): a packed row holds several samples."""
  b, l = batch["loss_mask"].shape
  seg = batch["segment_ids"].astype(jnp.int32) if "segment_ids" in batch \
      else jnp.ones((b, l), jnp.int32)
  row = jnp.arange(b, dtype=jnp.int32)[:, None]
  # Rows hold at most l segments; ids are kept in [0, b*l) for segment_sum.
  return (row * l + jnp.clip(seg, 0, l - 1)).reshape(-1)


def history_logp(ref: Head | None, batch, history: str, impl: str):
  """Per-target log-probs of the reference / history model, [B*L]."""
  if history == "batch":
    if "ref_logp" not in batch:
      raise errors.DataError("history='batch' needs a precomputed "
                             "'ref_logp' [B, L] key in the batch")
    return batch["ref_logp"].astype(jnp.float32).reshape(-1)
  if history not in HISTORIES:
    raise errors.ConfigError(f"config.loss.options.history={history!r}: "
                             f"expected one of {HISTORIES}")
  if ref is None:
    raise errors.ConfigError("token selection with history='ref' needs the "
                             "reference head (the train step passes it)")
  return target_stats(ref, batch, impl=impl).logp


def _selected_xent(logp, batch, keep):
  wt = token_weights(batch).reshape(-1)
  mask = batch["loss_mask"].astype(jnp.float32).reshape(-1)
  kept = jnp.sum(keep * (mask > 0))
  # Counts (not *_sum): they add up over micro-batches as they should.
  return jnp.sum(keep * wt * -logp), kept, {
      "nll_sum": jnp.sum(keep * mask * -logp), "ntokens": kept,
      "ntrained": jnp.sum(mask)}


def _check_ratio(ratio):
  if not 0.0 < ratio <= 1.0:
    raise errors.ConfigError(f"config.loss.options.ratio={ratio}: expected "
                             "a fraction in (0, 1]")


@register("rho1", needs_ref=True)
def rho1(policy: Head, batch, *, ref: Head | None = None, ratio: float = 0.6,
         per_sample: bool = False, history: str = "ref", impl: str = "auto",
         history_decay: float = 0.99, history_every: int = 100):
  """Selective language modelling (Rho-1) with excess loss.

  score_t = L_θ(y_t) - L_ref(y_t) (detached); keep the top ⌈ρ·n⌉ trained
  targets of the batch (or of each sample with `per_sample`); loss = CE
  summed over kept targets / number kept. Lin et al., "Rho-1: Not All
  Tokens Are What You Need" (arXiv 2404.07965, eq. 3: L_SLM = -1/(N·k%)
  Σ I_k%(x_i) log P(x_i)); microsoft/rho.

  The "batch" is what one loss call sees: one micro-batch on one host
  (each host's rows), so the kept fraction is exact per call; the step
  divides by the summed kept counts. The reference is the frozen base
  model (`history='ref'`, computed in the step) or precomputed log-probs
  in `batch['ref_logp']` (`history='batch'`; the reference forward still
  runs since `needs_ref` is per loss name).
  """
  del history_decay, history_every  # Read by the train setup.
  _check_ratio(ratio)
  logp = target_stats(policy, batch, impl=impl).logp
  ref_logp = history_logp(ref, batch, history, impl)
  valid = batch["loss_mask"].reshape(-1) > 0
  groups = sample_groups(batch) if per_sample else jnp.zeros_like(
      valid, jnp.int32)
  score = jax.lax.stop_gradient(ref_logp - logp)
  keep = select_top(score, valid, groups, ratio)
  return _selected_xent(logp, batch, keep)


def _group_minmax(x_N, valid_N, group_N):
  """(x - min_g) / (max_g - min_g + 1e-8) over valid entries of each group."""
  n = x_N.shape[0]
  lo = jax.ops.segment_min(jnp.where(valid_N, x_N, jnp.inf), group_N,
                           num_segments=n)[group_N]
  hi = jax.ops.segment_max(jnp.where(valid_N, x_N, -jnp.inf), group_N,
                           num_segments=n)[group_N]
  return jnp.where(valid_N, (x_N - lo) / (hi - lo + 1e-8), 0.0)


def target_attention(mass_BxL, batch):
  """Attention importance per target, [B*L].

  ssToken scores response token x_i by the attention mass its own query
  puts on the prompt (verified-formulas §3). Target t is token t+1, whose
  query is position t+1 when that is in the same segment; a segment's last
  target (not an input token) uses position t's query.
  """
  seg = batch["segment_ids"]
  same_next = jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (0, 1)))
  nxt = jnp.pad(mass_BxL[:, 1:], ((0, 0), (0, 1)))
  return jnp.where(same_next, nxt, mass_BxL).astype(jnp.float32).reshape(-1)


@register("sstoken", needs_ref=True, needs_attn_mass=True)
def sstoken(policy: Head, batch, *, ref: Head | None = None,
            ratio: float = 0.6, gamma: float = 0.5, history: str = "ref",
            impl: str = "auto", history_decay: float = 0.99,
            history_every: int = 100, attention: bool = True,
            warmup_steps: int = 0):
  """ssToken: self-modulated + semantic-aware token selection.

  Qin et al., "ssToken: Self-modulated and Semantic-aware Token Selection
  for LLM Fine-tuning"; official code jianke0604/ssToken
  (`scripts/finetune_with_hook.py`, `filter_tokens_with_attention_loss`):

    REL_t   = L_his(y_t) - L_θ(y_t)                      (detached)
    Score_t = γ·minmax_sample(REL)_t + (1-γ)·Attn_t
    keep the top ⌈ρ·n_resp⌉ targets of each sample; loss = mean CE over
    the kept targets (denominator: number kept).

  The history model is the frozen base model, as in the released code
  (`history='ref'`, computed in the step), precomputed log-probs in
  `batch['ref_logp']` (`history='batch'`), or a past copy of the trained
  params kept in the state: an EMA (`history='ema'`, `history_decay`) or a
  snapshot refreshed every `history_every` steps (`history='snapshot'`).

  Attn_t is the last layer's head-averaged attention mass from the
  response token to its prompt, computed by the policy forward in the same
  step (`policy.attn_mass`, detached; see `target_attention` for the
  alignment) when `attention` is on; precomputed values may come in
  `batch['attn_importance']` [B, L] instead. With neither, the score is
  γ·minmax(REL) (the paper's "self-modulated only" ablation). The code's
  warm start (γ = 0, attention only, for the first 10k samples) is
  `warmup_steps` optimizer steps here.
  """
  del history_decay, history_every  # Read by the train setup.
  _check_ratio(ratio)
  logp = target_stats(policy, batch, impl=impl).logp
  his_logp = history_logp(ref, batch, history, impl)
  valid = batch["loss_mask"].reshape(-1) > 0
  groups = sample_groups(batch)
  rel = jax.lax.stop_gradient(logp - his_logp)  # L_his - L_θ
  attn = None
  if attention and policy.attn_mass is not None:
    attn = target_attention(policy.attn_mass, batch)
  elif "attn_importance" in batch:
    attn = batch["attn_importance"].astype(jnp.float32).reshape(-1)
  if attn is not None and warmup_steps and "step" in batch:
    gamma = jnp.where(batch["step"] < warmup_steps, 0.0, gamma)
  score = gamma * _group_minmax(rel, valid, groups)
  if attn is not None:
    score = score + (1.0 - gamma) * attn
  keep = select_top(score, valid, groups, ratio)
  return _selected_xent(logp, batch, keep)
