"""LongLoRA: S²-Attn vs dense attention and vs a numpy float64 reference;
LoRA with trainable embeddings and norms through the real step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import data, models, tree
from tunejax.models import layers
from tunejax.train import setup
from tests.peft.common import CFG
from tests.train.helpers import random_batch, tiny_config

B, L, H, K = 2, 16, 4, 8


def _inputs(g, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, L, H, K)).astype(np.float32)
  k = rng.normal(size=(B, g, L, K)).astype(np.float32)
  v = rng.normal(size=(B, g, L, K)).astype(np.float32)
  seg = np.ones((B, L), np.int32)
  seg[0, 10:] = 2  # two packed documents
  seg[1, 13:] = 0  # padding tail
  idx = np.arange(L)
  mask = np.asarray(layers.attention_mask(
      jnp.asarray(idx), jnp.asarray(idx), jnp.asarray(seg), jnp.asarray(seg),
      jnp.asarray(seg), jnp.asarray(seg), None))
  return q, k, v, mask


def _np_s2(q, k, v, mask, group):
  """Per head: shifted heads group token i by (i − G/2) mod L; keys must
  also pass the usual mask (causal by original index, same segment)."""
  h, g = q.shape[2], k.shape[1]
  out = np.zeros(q.shape, np.float64)
  idx = np.arange(L)
  for hd in range(h):
    gid = (idx - group // 2) % L // group if hd >= h // 2 else idx // group
    allowed = mask & (gid[:, None] == gid[None, :])[None]
    kv = hd // (h // g)
    s = np.einsum("bik,bjk->bij", q[:, :, hd].astype(np.float64),
                  k[:, kv].astype(np.float64)) / np.sqrt(K)
    s = np.where(allowed, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, hd] = p @ v[:, kv].astype(np.float64)
  return out


_CFG = dataclasses.replace(CFG, n_heads=H, head_dim=K)


@pytest.mark.parametrize("g", [2, 1])  # GQA halves / repeated kv heads
def test_group_covering_sequence_is_dense_attention(g):
  q, k, v, mask = _inputs(g)
  got = layers.s2_attention(_CFG, q, k, v, mask, L)
  want = layers.attention(_CFG, q, [(k, v, mask)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("g,group", [(2, 8), (1, 4), (4, 2)])
def test_shifted_groups_equal_numpy_reference(g, group):
  q, k, v, mask = _inputs(g, seed=g)
  got = layers.s2_attention(_CFG, q, k, v, mask, group)
  want = _np_s2(q, k, v, mask, group)
  real = mask.any(-1)  # fully masked (padding) queries are unspecified
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5)


def test_model_forward_uses_s2_and_dense_when_group_is_whole(base):
  params, tokens = base  # [2, 12]
  fwd = jax.jit(models.forward, static_argnames=("cfg",))
  dense = np.asarray(fwd(cfg=CFG, params=params, tokens_BxL=tokens))
  whole = dataclasses.replace(CFG, s2_group=12)
  np.testing.assert_allclose(
      np.asarray(fwd(cfg=whole, params=params, tokens_BxL=tokens)), dense,
      atol=1e-5)
  s2 = np.asarray(fwd(cfg=dataclasses.replace(CFG, s2_group=4),
                      params=params, tokens_BxL=tokens))
  assert np.abs(s2 - dense).max() > 1e-4
  np.testing.assert_allclose(s2[:, :2], dense[:, :2], atol=1e-5)  # causal


def test_longlora_trains_lora_embeddings_and_norms():
  cfg = tiny_config(
      model={"overrides": {"vocab_size": 259, "s2_group": 8}},
      peft={"method": "lora", "rank": 4, "alpha": 8.0,
            "also_trainable": (r"embed/embedding", r".*norm/scale")},
      optim={"lr": 1e-2})
  model_cfg, _ = setup.load_model(cfg.model)
  assert model_cfg.s2_group == 8
  state, run = setup.build(cfg, model_cfg, None)
  emb0 = np.asarray(state.params["model"]["embed"]["embedding"])
  step = setup.jit_train_step(run, 1)
  losses = []
  for i in range(4):
    b = data.to_global(random_batch(i % 2), run.mesh, run.batch_sharding)
    state, met = step(state, b, jax.random.PRNGKey(0))
    losses.append(float(met["loss"]))
  assert losses[-1] < losses[0]
  names = set(tree.flatten(state.params))
  assert {"model/embed/embedding", "model/final_norm/scale",
          "model/layers/attn_norm/scale"} <= names
  assert not any("norm" in n or "embed" in n
                 for n in tree.flatten(state.frozen))
  assert np.abs(np.asarray(state.params["model"]["embed"]["embedding"])
                - emb0).max() > 0
  merged = run.method.merged(state.params, state.frozen)
  assert set(tree.flatten(merged)) == set(tree.flatten(
      models.init(model_cfg, jax.random.PRNGKey(0))))


def test_training_uses_s2_attention_and_eval_attends_in_full():
  from tunejax import losses  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(model={"overrides": {"vocab_size": 259, "s2_group": 8}},
                    peft={"method": "lora", "rank": 4})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  b = {k: jnp.asarray(v) for k, v in random_batch(0).items()}
  train_h = run.apply_fn(state.params, state.frozen, {**b, "step": 0},
                         jax.random.PRNGKey(0))[0].h_BxLxD
  eval_h = run.eval_apply_fn(state.params, state.frozen, b, None)[0].h_BxLxD
  base, ad = run.method.assemble(state.params, state.frozen)
  tokens, pos, seg = losses.model_inputs(b)
  dense, s2 = (models.hidden(dataclasses.replace(model_cfg, s2_group=g), base,
                             tokens, pos, seg, adapters=ad,
                             seam=run.method.seam) for g in (0, 8))
  np.testing.assert_allclose(eval_h, dense, atol=1e-6)
  np.testing.assert_allclose(train_h, s2, atol=1e-6)
  assert np.abs(np.asarray(dense) - np.asarray(s2)).max() > 1e-3
