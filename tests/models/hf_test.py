"""tunejax vs Hugging Face transformers on tiny random models per family.

Reference: the torch models of conftest.py (float32, eager attention).
Tolerance: max abs logit difference <= 1e-4 (measured ~5e-6).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.models.conftest import FAMILIES, VOCAB, hf_logits
from tunejax import models

TOL = 1e-4


def _tokens(b, l, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB, (b, l))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(family, hf_models, loaded):
  model, _ = hf_models[family]
  cfg, params = loaded[family]
  tokens = _tokens(2, 40)  # Longer than the sliding window (8).
  ref = hf_logits(model, tokens)
  out = np.asarray(models.forward(cfg, params, jnp.asarray(tokens)))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_config_mapping(loaded):
  cfg, _ = loaded["gemma3"]
  assert cfg.layer_types == ("local",) * 5 + ("global",)
  assert (cfg.rope_theta, cfg.local_theta) == (1e6, 1e4)
  assert cfg.qk_norm and cfg.post_norms and cfg.norm_offset == 1.0
  g2, _ = loaded["gemma2"]
  assert g2.layer_types == ("local", "global")
  assert (g2.attn_softcap, g2.final_logit_softcap) == (2.0, 3.0)
  llama, _ = loaded["llama"]
  assert llama.rope_scaling["rope_type"] == "llama3"
  assert not llama.tie_embeddings and loaded["qwen2"][0].qkv_bias


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_left_padded_rows_match_hf(family, hf_models, loaded):
  """Left padding via segment 0 + shifted positions equals HF's mask."""
  model, _ = hf_models[family]
  cfg, params = loaded[family]
  tokens = _tokens(2, 24, seed=1)
  mask = np.ones_like(tokens)
  mask[0, :5] = 0
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref = hf_logits(model, tokens, mask, pos)
  out = np.asarray(models.forward(cfg, params, jnp.asarray(tokens),
                                  jnp.asarray(pos), jnp.asarray(mask)))
  np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3"])
def test_save_hf_round_trip(family, hf_models, loaded, tmp_path):
  model, _ = hf_models[family]
  cfg, params = loaded[family]
  if cfg.query_pre_attn_scalar:  # As GGUF metadata gives it: a float.
    cfg = cfg.replace(query_pre_attn_scalar=float(cfg.query_pre_attn_scalar))
  out_dir = str(tmp_path / "export")
  # A tiny shard limit forces a sharded checkpoint with an index file.
  models.save_hf(cfg, params, out_dir, max_shard_bytes=40_000)
  files = sorted(os.listdir(out_dir))
  assert "model.safetensors.index.json" in files and len(files) > 3
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, attn_implementation="eager").eval()
  tokens = _tokens(1, 20, seed=2)
  np.testing.assert_allclose(hf_logits(reloaded, tokens),
                             hf_logits(model, tokens), atol=TOL, rtol=0)
  cfg2, params2 = models.load(out_dir)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(params) == jax.tree.structure(params2)


def test_save_hf_bf16_and_replace(loaded, tmp_path):
  cfg, params = loaded["llama"]
  cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out_dir = str(tmp_path / "bf16")
  models.save_hf(cfg, params, out_dir)  # Then overwritten atomically.
  models.save_hf(cfg16, p16, out_dir)
  with open(os.path.join(out_dir, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  cfg2, p2 = models.load(out_dir)
  assert cfg2.param_dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p2)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_hf(family, hf_models, loaded):
  model, _ = hf_models[family]
  cfg, params = loaded[family]
  prompts = [list(_tokens(1, n, seed=n)[0]) for n in (3, 12, 7)]
  width = max(map(len, prompts))
  ids = np.zeros((3, width), np.int64)
  mask = np.zeros((3, width), np.int64)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    ref = model.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask),
        max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True)
  ref_tokens = ref.sequences[:, width:].numpy()
  out = models.generate(cfg, params, prompts, 32, eos_id=2)
  tokens = np.asarray(out.tokens_BxT)
  t = ref_tokens.shape[1]
  np.testing.assert_array_equal(tokens[:, :t], ref_tokens)
  assert (tokens[:, t:] == 0).all()
  # Log-probs of the chosen tokens under the raw logits.
  ref_lp = torch.stack(ref.logits, 1).log_softmax(-1)
  ref_lp = torch.gather(ref_lp, 2, torch.tensor(ref_tokens)[..., None])[..., 0]
  lengths = np.asarray(out.lengths_B)
  for i in range(3):
    n = lengths[i]
    assert n == t or tokens[i, n - 1] == 2
    np.testing.assert_allclose(np.asarray(out.logps_BxT)[i, :n],
                               ref_lp[i, :n].numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attention_probe_mass_matches_hf_attentions(family, hf_models,
                                                    loaded):
  """Last-layer head-averaged attention mass on probed keys (ssToken's
  importance) equals HF's `output_attentions` (eager) contracted in numpy."""
  model, _ = hf_models[family]
  cfg, params = loaded[family]
  tokens = _tokens(2, 20, seed=4)
  probe = (np.random.RandomState(5).rand(2, 20) < 0.4).astype(np.float32)
  with torch.no_grad():
    att = model(torch.as_tensor(tokens), output_attentions=True).attentions
  want = np.einsum("bhls,bs->bl", att[-1].numpy().astype(np.float64),
                   probe) / att[-1].shape[1]
  _, aux = models.hidden(cfg, params, jnp.asarray(tokens), return_aux=True,
                         attn_probe_BxL=jnp.asarray(probe))
  got = np.asarray(aux["attn/probe_mass"])
  assert got.shape == (cfg.n_layers, 2, 20)
  np.testing.assert_allclose(got[-1], want, atol=1e-5, rtol=0)
