"""Soft prompt, prefix tuning and (IA)^3 logits == HF PEFT (torch) on a tiny
random Llama, with the same trained values copied into PEFT's modules."""
import copy

import jax
import numpy as np
import pytest

from tunejax import models, tree
from tests.peft.common import make_method

torch = pytest.importorskip("torch")
peft_hf = pytest.importorskip("peft")

TOKENS = np.random.default_rng(0).integers(3, 128, (2, 9))


def _ours(method, cfg, params, seed):
  t, f = method.init(jax.random.PRNGKey(seed), params)
  flat = tree.flatten(t)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(flat))
  t = tree.unflatten({n: x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                      for (n, x), k in zip(sorted(flat.items()), keys)})
  base, ad = method.assemble(t, f)
  logits = models.forward(cfg, base, TOKENS, adapters=ad, seam=method.seam)
  return jax.device_get(t), np.asarray(logits)


def _hf_logits(pm, n_skip=0):
  pm.eval()
  ids = torch.tensor(TOKENS)
  with torch.no_grad():
    out = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
  return out[:, n_skip:].float().numpy()


def _copy(param, value):
  with torch.no_grad():
    param.copy_(torch.tensor(np.asarray(value, np.float32)))


def test_soft_prompt_matches_peft(hf_llama):
  model, _, cfg, params = hf_llama
  t, ours = _ours(make_method(method="prompt", n_virtual=4), cfg, params, 0)
  pm = peft_hf.get_peft_model(copy.deepcopy(model), peft_hf.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=4))
  _copy(pm.prompt_encoder["default"].embedding.weight,
        t["prompt"]["embedding"])
  np.testing.assert_allclose(ours, _hf_logits(pm, 4), atol=1e-4, rtol=0)


def test_prefix_matches_peft(hf_llama):
  """PEFT's embedding [P, n_layers·2·G·K]: per token, layer-major, then
  key / value; the text starts at position P (HF cache length)."""
  model, _, cfg, params = hf_llama
  t, ours = _ours(make_method(method="prefix", n_virtual=3), cfg, params, 1)
  pm = peft_hf.get_peft_model(copy.deepcopy(model), peft_hf.PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=3))
  kv = np.stack([t["prefix"]["k"], t["prefix"]["v"]], axis=2)  # [N,P,2,GK]
  _copy(pm.prompt_encoder["default"].embedding.weight,
        kv.transpose(1, 0, 2, 3).reshape(3, -1))
  np.testing.assert_allclose(ours, _hf_logits(pm), atol=1e-4, rtol=0)


def test_ia3_matches_peft(hf_llama):
  model, _, cfg, params = hf_llama
  t, ours = _ours(make_method(method="ia3"), cfg, params, 2)
  pm = peft_hf.get_peft_model(copy.deepcopy(model), peft_hf.IA3Config(
      task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
      feedforward_modules=["down_proj"]))
  lay = t["layers"]
  for i, layer in enumerate(pm.base_model.model.model.layers):
    _copy(layer.self_attn.k_proj.ia3_l["default"],
          lay["attn"]["k"]["ia3"][i][:, None])
    _copy(layer.self_attn.v_proj.ia3_l["default"],
          lay["attn"]["v"]["ia3"][i][:, None])
    _copy(layer.mlp.down_proj.ia3_l["default"],
          lay["mlp"]["down"]["ia3"][i][None, :])
  np.testing.assert_allclose(ours, _hf_logits(pm), atol=1e-4, rtol=0)
