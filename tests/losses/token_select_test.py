"""Rho-1 and ssToken selection: exact top-ρ counts and values vs numpy."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import losses
from tunejax.losses import token_select

B, L, D, V = 2, 16, 8, 24


def _case(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, L, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) / 2).astype(np.float32)
  h_ref = (h + 0.5 * rng.normal(size=h.shape)).astype(np.float32)
  seg = np.ones((B, L), np.int32)
  seg[:, 7:] = 2
  seg[1, 13:] = 0  # padding
  mask = ((rng.random((B, L)) < 0.8) & (seg > 0)).astype(np.float32)
  batch = {"tokens": rng.integers(0, V, (B, L)).astype(np.int32),
           "targets": rng.integers(0, V, (B, L)).astype(np.int32),
           "loss_mask": mask, "segment_ids": seg}
  return h, w, h_ref, batch


def _gold_logp(h, w, y):
  z = h.reshape(-1, D).astype(np.float64) @ w.astype(np.float64)
  m = z.max(-1, keepdims=True)
  logp = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
  return np.take_along_axis(logp, y.reshape(-1, 1), 1)[:, 0]


def _top(score, idx, ratio):
  """Indices (from idx) of the top ⌈ρ·n⌉ scores; ties to the earlier."""
  k = math.ceil(round(ratio * len(idx), 6))
  order = sorted(idx, key=lambda i: (-score[i], i))
  return set(order[:k])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.6, 1.0])
def test_select_top_keeps_exactly_ceil_ratio(ratio):
  rng = np.random.default_rng(1)
  n = 40
  score = rng.integers(0, 6, n).astype(np.float32)  # many ties
  valid = rng.random(n) < 0.7
  group = rng.integers(0, 3, n).astype(np.int32)
  keep = np.asarray(token_select.select_top(
      jnp.asarray(score), jnp.asarray(valid), jnp.asarray(group), ratio))
  for g in range(3):
    idx = [i for i in range(n) if valid[i] and group[i] == g]
    assert set(np.flatnonzero(keep * (group == g))) == _top(score, idx, ratio)
  assert not np.any(keep * ~valid)


@pytest.mark.parametrize("per_sample", [False, True])
def test_rho1_matches_numpy(per_sample):
  h, w, h_ref, batch = _case()
  ratio = 0.6
  y = batch["targets"]
  logp, ref_logp = _gold_logp(h, w, y), _gold_logp(h_ref, w, y)
  excess = ref_logp - logp  # L_θ - L_ref
  valid = batch["loss_mask"].reshape(-1) > 0
  groups = (np.arange(B)[:, None] * 100 + batch["segment_ids"]).reshape(-1)
  if not per_sample:
    groups = np.zeros_like(groups)
  kept = set()
  for g in np.unique(groups[valid]):
    kept |= _top(excess, list(np.flatnonzero(valid & (groups == g))), ratio)
  kept = sorted(kept)
  want = -logp[kept].mean()
  ref = losses.Head(jnp.asarray(h_ref), jnp.asarray(w))
  s, d, aux = losses.get("rho1")(losses.Head(h, w), batch, ref=ref,
                                 ratio=ratio, per_sample=per_sample)
  assert float(d) == len(kept) == float(aux["ntokens"])
  np.testing.assert_allclose(float(s / d), want, rtol=1e-5)
  # Precomputed reference log-probs select the same tokens.
  s2, d2, _ = losses.get("rho1")(
      losses.Head(h, w), {**batch, "ref_logp": ref_logp.reshape(B, L)},
      ratio=ratio, per_sample=per_sample, history="batch")
  np.testing.assert_allclose(float(s2 / d2), want, rtol=1e-5)


@pytest.mark.parametrize("with_attn", [False, True])
def test_sstoken_matches_numpy(with_attn):
  h, w, h_ref, batch = _case(2)
  ratio, gamma = 0.5, 0.5
  y = batch["targets"]
  logp, his_logp = _gold_logp(h, w, y), _gold_logp(h_ref, w, y)
  rel = logp - his_logp  # L_his - L_θ
  attn = np.random.default_rng(3).random((B, L)).astype(np.float32)
  if with_attn:
    batch = {**batch, "attn_importance": attn}
  valid = batch["loss_mask"].reshape(-1) > 0
  groups = (np.arange(B)[:, None] * 100 + batch["segment_ids"]).reshape(-1)
  kept = set()
  for g in np.unique(groups[valid]):
    idx = np.flatnonzero(valid & (groups == g))
    r = rel[idx]
    score = np.zeros_like(rel)
    score[idx] = gamma * (r - r.min()) / (r.max() - r.min() + 1e-8)
    if with_attn:
      score[idx] += (1 - gamma) * attn.reshape(-1)[idx]
    kept |= _top(score, list(idx), ratio)
  kept = sorted(kept)
  ref = losses.Head(jnp.asarray(h_ref), jnp.asarray(w))
  s, d, _ = losses.get("sstoken")(losses.Head(h, w), batch, ref=ref,
                                  ratio=ratio, gamma=gamma)
  assert float(d) == len(kept)
  np.testing.assert_allclose(float(s / d), -logp[kept].mean(), rtol=1e-5)


def test_prompt_keys_and_target_attention_alignment():
  # Row: segment 1 = prompt [0, 1, 2] + response [3, 4] (targets at 2, 3
  # trained, target 4 = EOS trained), segment 2 = [5, 6] prompt-only, pad.
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 0]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 0, 0, 0]], np.float32)
  batch = {"segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}
  np.testing.assert_array_equal(losses.prompt_keys(batch),
                                [[1, 1, 1, 0, 0, 1, 1, 0]])
  mass = jnp.asarray([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
  # Target t scores token t+1 by its own query; a segment's last target
  # (t = 4, 6) falls back to its own position.
  np.testing.assert_allclose(
      token_select.target_attention(mass, batch),
      [0.1, 0.2, 0.3, 0.4, 0.4, 0.6, 0.6, 0.7])


def test_sstoken_uses_policy_attention_mass():
  h, w, h_ref, batch = _case(4)
  mass = np.random.default_rng(5).random((B, L)).astype(np.float32)
  aligned = np.asarray(token_select.target_attention(jnp.asarray(mass),
                                                     batch)).reshape(B, L)
  ref = losses.Head(jnp.asarray(h_ref), jnp.asarray(w))
  fn = losses.get("sstoken")
  got = fn(losses.Head(h, w, attn_mass=jnp.asarray(mass)), batch, ref=ref,
           ratio=0.5)
  want = fn(losses.Head(h, w), {**batch, "attn_importance": aligned},
            ref=ref, ratio=0.5)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert float(got[1]) == float(want[1])
  # attention=False ignores the mass; warm-up (γ = 0) uses it alone.
  off = fn(losses.Head(h, w, attn_mass=jnp.asarray(mass)), batch, ref=ref,
           ratio=0.5, attention=False)
  plain = fn(losses.Head(h, w), batch, ref=ref, ratio=0.5)
  np.testing.assert_allclose(off[0], plain[0], rtol=1e-6)
  warm = fn(losses.Head(h, w, attn_mass=jnp.asarray(mass)),
            {**batch, "step": jnp.asarray(0)}, ref=ref, ratio=0.5,
            gamma=0.5, warmup_steps=10)
  attn_only = fn(losses.Head(h, w), {**batch, "attn_importance": aligned},
                 ref=ref, ratio=0.5, gamma=0.0)
  np.testing.assert_allclose(warm[0], attn_only[0], rtol=1e-6)


def test_selection_rejects_bad_ratio():
  h, w, h_ref, batch = _case()
  with pytest.raises(Exception, match="ratio"):
    losses.get("rho1")(losses.Head(h, w), batch,
                       ref=losses.Head(h_ref, w), ratio=0.0)
