"""The LoRA family vs Hugging Face `peft` (torch) on a tiny random Llama.

Forward: tunejax adapters are exported in PEFT's format and loaded with
`peft.PeftModel.from_pretrained` on the transformers model; logits must
agree within 1e-4 (float32). Inits (PiSSA, OLoRA, DoRA) are compared with
the ones PEFT computes on the same weights.
"""
import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch

from tests.models.conftest import VOCAB, hf_logits
from tunejax import config as config_lib, models, peft, tree

TOL = 1e-4
METHODS = ("lora", "rslora", "dora", "pissa", "olora", "vera")
TOKENS = np.random.RandomState(0).randint(3, VOCAB, (2, 16))


def _method(**kw):
  return peft.get(config_lib.build(peft.PeftConfig, kw, "peft"))


def _trained(method, params, seed=0):
  """Init, then move every trainable leaf as a few steps of training would."""
  ad, frozen = method.init(jax.random.PRNGKey(seed), params)
  leaves, tdef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tdef, leaves), frozen


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg, seam, base, adapters):
  return models.forward(cfg, base, jnp.asarray(TOKENS), adapters=adapters,
                        seam=seam)


def _logits(method, ad, frozen, cfg):
  base, adapters = method.assemble(ad, frozen)
  return np.asarray(_forward(cfg, method.seam, base, adapters))


@pytest.fixture(scope="module", params=METHODS)
def exported(request, hf_llama, tmp_path_factory):
  _, _, cfg, params = hf_llama
  kw = dict(method=request.param, rank=4, alpha=8.0)
  if request.param == "lora":  # Per-target overrides -> rank/alpha_pattern.
    kw["overrides"] = ((r"layers/mlp/down", 2, 4.0),)
  m = _method(**kw)
  ad, frozen = _trained(m, params)
  out = str(tmp_path_factory.mktemp("adapter") / request.param)
  assert m.export_adapter(ad, frozen, cfg, out)
  return request.param, m, ad, frozen, out


def test_peft_loads_export_and_matches(exported, hf_llama):
  name, m, ad, frozen, out = exported
  model, _, cfg, _ = hf_llama
  assert sorted(os.listdir(out)) == ["adapter_config.json",
                                     "adapter_model.safetensors"]
  pm = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
  ref = hf_logits(pm, TOKENS)
  got = _logits(m, ad, frozen, cfg)
  assert np.abs(got - hf_logits(model, TOKENS)).max() > 1e-3  # not a no-op
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_import_round_trips(exported, hf_llama):
  name, m, ad, frozen, out = exported
  _, _, cfg, params = hf_llama
  pcfg, ad2, frozen2 = peft.import_adapter(out, cfg, params)
  m2 = peft.get(pcfg)
  if name not in ("pissa", "olora"):  # those import as rank-2r plain LoRA
    assert pcfg.method == {"rslora": "lora"}.get(name, name)
    for a, b in zip(jax.tree.leaves(ad), jax.tree.leaves(ad2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(_logits(m2, ad2, frozen2, cfg),
                             _logits(m, ad, frozen, cfg), atol=1e-5, rtol=0)


def test_import_peft_saved_adapter(hf_llama, tmp_path):
  """An adapter PEFT itself created (rank/alpha patterns, DoRA)."""
  model, _, cfg, params = hf_llama
  lc = hf_peft.LoraConfig(
      r=4, lora_alpha=8, use_dora=True,
      target_modules=["q_proj", "v_proj", "down_proj"],
      rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
  torch.manual_seed(0)
  pm = hf_peft.get_peft_model(copy.deepcopy(model), lc)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.add_(0.05 * torch.randn_like(p))
  pm.save_pretrained(str(tmp_path))
  pcfg, ad, frozen = peft.import_adapter(str(tmp_path), cfg, params)
  m = peft.get(pcfg)
  np.testing.assert_allclose(_logits(m, ad, frozen, cfg),
                             hf_logits(pm.eval(), TOKENS), atol=TOL, rtol=0)


def _peft_layers(model, cfg, init, **kw):
  lc = hf_peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                          target_modules=["q_proj", "down_proj"], **kw)
  pm = hf_peft.get_peft_model(copy.deepcopy(model), lc)
  return {n: mod for n, mod in pm.named_modules()
          if n.endswith(("q_proj", "down_proj")) and hasattr(mod, "lora_A")}


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_residual_init_matches_peft(name, hf_llama):
  """Residual base and s·A B equal PEFT's (PiSSA's SVD signs cancel)."""
  model, _, cfg, params = hf_llama
  m = _method(method=name, rank=4, alpha=8.0,
              targets=(r"layers/(attn/q|mlp/down)",))
  ad, frozen = m.init(jax.random.PRNGKey(0), params)
  mods = _peft_layers(model, cfg, name)
  for module in ("layers/attn/q", "layers/mlp/down"):
    res = np.asarray(tree.flatten(frozen)[module + "/kernel"])
    a = np.asarray(tree.flatten(ad)[module + "/lora_a"])
    b = np.asarray(tree.flatten(ad)[module + "/lora_b"])
    names = peft.peft_format.hf_module_names(cfg, module)
    for i, n in enumerate(names):
      mod = mods["base_model.model." + n]
      w_ref = mod.base_layer.weight.detach().numpy().T
      np.testing.assert_allclose(res[i], w_ref, atol=1e-5, rtol=0)
      ba = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight)
      np.testing.assert_allclose(2.0 * a[i] @ b[i], 2.0 * ba.detach().numpy().T,
                                 atol=1e-5, rtol=0)
      if name == "olora":  # QR is unique given R's sign convention.
        np.testing.assert_allclose(
            a[i], mod.lora_A["default"].weight.detach().numpy().T, atol=1e-5)


def test_dora_magnitude_init_matches_peft(hf_llama):
  model, _, cfg, params = hf_llama
  m = _method(method="dora", rank=4, alpha=8.0,
              targets=(r"layers/(attn/q|mlp/down)",))
  ad, _ = m.init(jax.random.PRNGKey(0), params)
  mods = _peft_layers(model, cfg, True, use_dora=True)
  for module in ("layers/attn/q", "layers/mlp/down"):
    mag = np.asarray(tree.flatten(ad)[module + "/magnitude"])
    for i, n in enumerate(peft.peft_format.hf_module_names(cfg, module)):
      ref = mods["base_model.model." + n].lora_magnitude_vector["default"]
      np.testing.assert_allclose(mag[i], ref.weight.detach().numpy(),
                                 rtol=1e-6)
