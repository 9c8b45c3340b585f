"""Token-level SFT losses."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tunejax import errors, kernels
from tunejax.losses.base import Head, register


def token_weights(batch) -> jnp.ndarray:
  """Per-target weight: loss_mask times optional data-provided weights."""
  w = batch["loss_mask"].astype(jnp.float32)
  if "weights" in batch:
    w = w * batch["weights"].astype(jnp.float32)
  return w


def _xent_sums(h_NxD, head: Head, targets_N, wt_N, *, label_smoothing,
               z_loss, impl, grad_in_forward):
  """(weighted loss sum, weighted nll sum) over N tokens."""
  if grad_in_forward:
    loss_sum, stats = kernels.token_loss(
        h_NxD, head.w, targets_N,
        kernels.cross_entropy_terms(label_smoothing, z_loss), wt_N,
        softcap=head.softcap, vocab_axis=head.vocab_axis)
    return loss_sum, -jnp.sum(wt_N * stats.logp)
  stats = kernels.token_stats(h_NxD, head.w, targets_N, softcap=head.softcap,
                              label_smoothing=label_smoothing, impl=impl,
                              vocab_axis=head.vocab_axis)
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
                  target_capacity: float = 1.0, impl: str = "auto",
                  grad_in_forward: bool = False):
  """Masked next-token cross-entropy, summed over weighted target tokens.

  loss_t = -(1-ε)·log p(y_t) - ε·mean_v log p(v) + z·lse_t²   (per target t)
  The denominator is the number of trained targets (sum of the loss mask),
  so accumulation over micro-batches and hosts is exactly token-weighted.

  `target_capacity` < 1 runs the unembedding only on trained positions: the
  first ⌈capacity·N⌉ of them are gathered (prompt tokens of completion-only
  SFT never reach the 262k-wide head). If a batch has more trained
  positions than that, an exact full pass is taken instead (`lax.cond`), so
  the result never depends on the capacity — only the speed does.

  `grad_in_forward` computes the loss with `kernels.token_loss`: the
  gradient is formed in the forward pass, three matmul passes over the
  unembedding instead of four when it is trained (full fine-tuning), for
  one `[block_n, V]` float32 logit block and float32 dw sums of memory.
  """
  del ref
  if grad_in_forward and impl not in ("auto", "xla"):
    raise errors.ConfigError(
        f"config.loss.options: grad_in_forward runs the chunked XLA op; "
        f"impl={impl!r} does not apply (use 'auto')")
  b, l, d = policy.h_BxLxD.shape
  h_NxD = policy.h_BxLxD.reshape(b * l, d)
  y_N = batch["targets"].reshape(-1)
  wt_N = token_weights(batch).reshape(-1)
  trained_N = batch["loss_mask"].reshape(-1) > 0
  sums = lambda h, y, wt: _xent_sums(
      h, policy, jnp.where(wt != 0, y, -1), wt,
      label_smoothing=label_smoothing, z_loss=z_loss, impl=impl,
      grad_in_forward=grad_in_forward)
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


# ----------------------------------------------------------------------------
# Helpers shared by the token-level losses below and in token_select.py,
# rollout.py.


def flat_h(head: Head) -> jnp.ndarray:
  """[B, L, D] final hidden states -> [B*L, D]."""
  b, l, d = head.h_BxLxD.shape
  return head.h_BxLxD.reshape(b * l, d)


def target_stats(head: Head, batch, *, impl: str = "auto",
                 want_entropy: bool = False) -> kernels.TokenStats:
  """token_stats of the batch targets; untrained targets are ignored (-1).

  Returns [B*L] arrays (logp is 0 at untrained positions).
  """
  y_N = jnp.where(batch["loss_mask"].reshape(-1) > 0,
                  batch["targets"].reshape(-1), -1)
  return kernels.token_stats(flat_h(head), head.w, y_N,
                             softcap=head.softcap, want_entropy=want_entropy,
                             impl=impl, vocab_axis=head.vocab_axis)


def n_targets(batch) -> jnp.ndarray:
  """The step's denominator: the number of trained targets."""
  return jnp.sum(batch["loss_mask"].astype(jnp.float32))


def loss_rng(batch, seed: int) -> jax.Array:
  """A PRNG key for losses that sample.

  The train step passes its per-micro-batch key as `batch['rng']` (resume
  reproduces it bit for bit); elsewhere (eval, direct calls) the key is
  derived from `seed` and a hash of the batch tokens, so it is still
  deterministic and differs between batches.
  """
  if "rng" in batch:
    return jax.random.fold_in(batch["rng"], seed)
  tok = batch["tokens"].reshape(-1).astype(jnp.uint32)
  mult = jnp.arange(1, tok.shape[0] + 1, dtype=jnp.uint32) * jnp.uint32(
      2654435761)
  return jax.random.fold_in(jax.random.PRNGKey(seed), jnp.sum(tok * mult))


def _require_ref(ref: Head | None, name: str) -> Head:
  if ref is None:
    raise errors.ConfigError(
        f"config.loss.name={name!r} needs the reference model's head (the "
        "train step provides it; direct callers must pass ref=)")
  return ref


@register("dft")
def dft(policy: Head, batch, *, ref: Head | None = None, impl: str = "auto"):
  """Dynamic Fine-Tuning: CE weighted by the detached gold-token probability.

  loss = -Σ_t m_t·sg(p_t)·log p_t / Σ_t m_t  (m_t = loss_mask·weights).
  Wu et al., "On the Generalization of SFT: A Reinforcement Learning
  Perspective with Reward Rectification" (arXiv 2508.05629); the official
  repo yongliang-wu/DFT, TRL `loss_type="dft"` and LLaMA-Factory agree on
  the token-mean over all valid targets of the (global) batch.
  """
  del ref
  logp = target_stats(policy, batch, impl=impl).logp
  wt = token_weights(batch).reshape(-1)
  p = jax.lax.stop_gradient(jnp.exp(logp))
  return jnp.sum(wt * p * -logp), n_targets(batch), {
      "nll_sum": jnp.sum(wt * -logp), "prob_sum": jnp.sum(wt * p)}


BASES = ("dft", "sft")


@register("asft", needs_ref=True)
def anchored_sft(policy: Head, batch, *, ref: Head | None = None,
                 kl_weight: float = 0.1, direction: str = "forward",
                 base: str = "dft", impl: str = "auto"):
  """Anchored SFT: DFT plus a full-vocabulary KL anchor to the reference.

  loss_t = sg(p_t)·(-log p_t) + λ·KL(π_ref(·|s_t) ‖ π_θ(·|s_t)), token-mean
  over trained targets. Zhu et al., "Anchored Supervised Fine-Tuning"
  (official repo zhuchichi56/ASFT `train.py`; LLaMA-Factory `asft`): the KL
  is forward with the reference first and λ = 0.1 (the README uses 0.05).
  The reference is the frozen base (PEFT adapters off), given by the step.

  Options:
    kl_weight: λ.
    direction: 'forward' = KL(π_ref ‖ π_θ) (paper); 'reverse' = KL(π_θ ‖
      π_ref) (the abstract-based guess, kept for ablations).
    base: 'dft' (paper) or 'sft' (the repo's "SFT + KL" ablation: plain CE).
  """
  ref = _require_ref(ref, "asft")
  if base not in BASES:
    raise errors.ConfigError(f"config.loss.options.base={base!r}: expected "
                             f"one of {BASES}")
  logp = target_stats(policy, batch, impl=impl).logp
  wt = token_weights(batch).reshape(-1)
  p = jax.lax.stop_gradient(jnp.exp(logp))
  fit = p * -logp if base == "dft" else -logp
  kl = kernels.token_kl(flat_h(policy), policy.w_DxV, flat_h(ref), ref.w_DxV,
                        direction=direction, softcap=policy.softcap,
                        impl="naive" if impl == "naive" else "auto")
  kl_sum = jnp.sum(wt * kl)
  return jnp.sum(wt * fit) + kl_weight * kl_sum, n_targets(batch), {
      "nll_sum": jnp.sum(wt * -logp), "kl_sum": kl_sum}


SCHEDULES = ("constant", "linear", "inverse_linear", "cosine")


def schedule_value(schedule: str, progress) -> jnp.ndarray:
  """A ramp over training progress in [0, 1] -> factor in [0, 1]."""
  t = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  if schedule == "constant":
    return jnp.ones_like(t)
  if schedule == "linear":
    return t
  if schedule == "inverse_linear":
    return 1.0 - t
  if schedule == "cosine":
    return 0.5 * (1.0 - jnp.cos(jnp.pi * t))
  raise errors.ConfigError(f"config.loss.options.schedule={schedule!r}: "
                           f"expected one of {SCHEDULES}")


def training_progress(batch, total_steps: int) -> jnp.ndarray:
  """step / total_steps from the step's `batch['step']`; 1.0 without it."""
  if "step" not in batch or total_steps <= 0:
    return jnp.float32(1.0)
  return jnp.asarray(batch["step"], jnp.float32) / total_steps


@register("fait")
def fault_aware(policy: Head, batch, *, ref: Head | None = None,
                schedule: str = "constant", total_steps: int = 0,
                impl: str = "auto"):
  """FAIT: CE with up-weighted error-sensitive spans, dynamically scheduled.

  Fan et al., "FAIT: Fault-Aware Fine-Tuning for Better Code Generation"
  (arXiv 2503.16913, later "FGit"): L = -(1/n) Σ_j w_j·log P(c_j | ·) with
  larger, dynamically adjusted w_j on error-sensitive tokens (line/token
  diffs between correct and incorrect-but-similar code). No official code
  was found and the exact schedule is not public (reference/verified-
  formulas.md §15: UNCERTAIN), so the form here is

    w_t = 1 + a(step / total_steps)·(weights_t - 1)

  where `weights` are the per-target weights from the data's span field
  (error-sensitive spans carry their target weight, e.g. 2.0; other
  trained tokens 1.0) and `a` is the schedule ('constant' = 1: static span
  weights; 'linear' ramps the up-weighting in; 'inverse_linear' anneals it
  out; 'cosine'). The step number comes from `batch['step']`, which the
  train step adds; without it (eval) a = 1. The denominator is the number
  of trained targets (the paper's 1/n).
  """
  del ref
  logp = target_stats(policy, batch, impl=impl).logp
  mask = batch["loss_mask"].astype(jnp.float32).reshape(-1)
  span_w = batch.get("weights", batch["loss_mask"]).astype(
      jnp.float32).reshape(-1)
  a = schedule_value(schedule, training_progress(batch, total_steps))
  wt = mask * (1.0 + a * (span_w - 1.0))
  return jnp.sum(wt * -logp), n_targets(batch), {
      # a·n / n: reported as the mean scale, exact under accumulation.
      "nll_sum": jnp.sum(mask * -logp), "fait_scale_sum": a * n_targets(batch)}
