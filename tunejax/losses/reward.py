"""Bradley-Terry reward model pieces: last-token scalar scores, pair loss.

A reward model maps a sequence to r = w·h_last + b, with h_last the final
hidden state at the sequence's last input position (it has read the whole
response; TRL's RewardTrainer / `AutoModelForSequenceClassification` take
the last non-padding token the same way). Trained on preference pairs with
L = −log σ(r(y_w) − r(y_l)) (Bradley & Terry 1952; Ouyang et al. 2022).
Pairs are (row, segment) slots of packed rows, as in `preference.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def last_positions(segment_ids_BxL):
  """Index of each (row, segment) slot's last position, [B, L + 1].

  Slot k of row i holds the last column whose segment id is k (k = 0 is
  padding and meaningless; absent segments give -1).
  """
  b, l = segment_ids_BxL.shape
  cols = jnp.broadcast_to(jnp.arange(l), (b, l))
  slot = jnp.arange(b)[:, None] * (l + 1) + segment_ids_BxL
  last = jax.ops.segment_max(cols.reshape(-1), slot.reshape(-1),
                             num_segments=b * (l + 1))
  return jnp.maximum(last, -1).reshape(b, l + 1)


def sequence_scores(h_BxLxD, segment_ids_BxL, head):
  """Scalar reward of every (row, segment) slot, [B, L + 1] (float32).

  `head` is {'w': [D], 'b': []}. Absent slots score from position 0 (junk);
  mask them with `segment_present`.
  """
  idx_BxS = jnp.maximum(last_positions(segment_ids_BxL), 0)
  h_BxSxD = jnp.take_along_axis(h_BxLxD, idx_BxS[..., None], axis=1)
  return (h_BxSxD.astype(jnp.float32) @ head["w"].astype(jnp.float32)
          + head["b"].astype(jnp.float32))


def segment_present(segment_ids_BxL):
  """[B, L + 1] float 0/1: slot k > 0 of row i has at least one token."""
  return (last_positions(segment_ids_BxL) >= 0).at[:, 0].set(False).astype(
      jnp.float32)


def bradley_terry(r_w, r_l, valid):
  """(Σ −log σ(r_w − r_l), number of pairs, aux sums) over valid slots."""
  margin = r_w - r_l
  aux = {"accuracy_sum": jnp.sum(valid * (margin > 0)),
         "margin_sum": jnp.sum(valid * margin),
         "rewards/chosen_sum": jnp.sum(valid * r_w),
         "rewards/rejected_sum": jnp.sum(valid * r_l)}
  loss = jnp.sum(valid * -jax.nn.log_sigmoid(margin))
  return loss, jnp.sum(valid), jax.tree.map(jax.lax.stop_gradient, aux)
