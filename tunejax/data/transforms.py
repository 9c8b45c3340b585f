"""Step-time batch transforms (pure functions of arrays and a key).

Masked Thought: Chen et al., "Masked Thought: Simply Masking Partial
Reasoning Steps Can Improve Mathematical Reasoning Learning of Language
Models" (official code: AlibabaResearch/DAMO-ConvAI, MaskedThought;
reference/verified-formulas.md §16). Each response input token is replaced,
independently with probability p, by a mask id; the prompt is never
touched and the targets stay the original tokens, so the loss is plain CE.
The rate warms up linearly over the first two thirds of training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_thought_rate(step, total_steps: int, max_rate: float,
                        warmup_fraction: float = 0.66):
  """p(step) = min(p_max·step / (warmup_fraction·total_steps + 1), p_max)."""
  ramp = max_rate * jnp.asarray(step, jnp.float32) / (
      warmup_fraction * total_steps + 1.0)
  return jnp.minimum(ramp, max_rate)


def response_inputs(loss_mask_BxL, segment_ids_BxL):
  """Input positions holding response tokens: token i is the trained target
  of position i-1 in the same segment (targets[i-1] == tokens[i])."""
  prev_trained = jnp.pad(loss_mask_BxL[:, :-1] > 0, ((0, 0), (1, 0)))
  same_seg = jnp.pad(segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1],
                     ((0, 0), (1, 0)))
  return prev_trained & same_seg & (segment_ids_BxL > 0)


def masked_thought(batch, rng, rate, mask_id: int):
  """Returns `batch` with a `rate` fraction of response input tokens
  replaced by `mask_id` (a dedicated mask token or the pad id); `targets`,
  `loss_mask` and everything else are unchanged."""
  eligible = response_inputs(batch["loss_mask"], batch["segment_ids"])
  drop = jax.random.bernoulli(rng, rate, eligible.shape) & eligible
  tokens = jnp.where(drop, jnp.asarray(mask_id, batch["tokens"].dtype),
                     batch["tokens"])
  return {**batch, "tokens": tokens}
