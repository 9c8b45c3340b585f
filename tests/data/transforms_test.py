"""Masked Thought: only response inputs are masked, targets unchanged."""
import jax
import numpy as np

from tunejax.data import transforms


def test_rate_warms_up_linearly_to_max():
  for step, want in [(0, 0.0), (33, 0.4 * 33 / 67), (66, 0.4 * 66 / 67),
                     (67, 0.4), (100, 0.4)]:
    np.testing.assert_allclose(
        float(transforms.masked_thought_rate(step, 100, 0.4)), want,
        rtol=1e-6)


def test_masks_only_response_inputs_at_the_rate():
  rng = np.random.default_rng(0)
  b, l = 64, 32
  tokens = rng.integers(5, 100, (b, l)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[:, 16:] = 2
  seg[:, -2:] = 0
  mask = np.zeros((b, l), np.float32)
  mask[:, 5:15] = 1  # response of segment 1: targets 5..14 = tokens 6..15
  mask[:, 20:29] = 1
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
           "loss_mask": mask, "segment_ids": seg}
  out = transforms.masked_thought(batch, jax.random.PRNGKey(0), 0.3,
                                  mask_id=0)
  changed = np.asarray(out["tokens"]) != tokens
  eligible = np.zeros((b, l), bool)
  eligible[:, 6:16] = True
  eligible[:, 21:30] = True
  assert not np.any(changed & ~eligible)
  assert np.all(np.asarray(out["tokens"])[changed] == 0)
  assert np.abs(changed[eligible].mean() - 0.3) < 0.04  # 1216 draws: 3σ
  np.testing.assert_array_equal(out["targets"], batch["targets"])
  np.testing.assert_array_equal(out["loss_mask"], mask)
