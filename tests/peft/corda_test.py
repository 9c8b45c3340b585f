"""CorDA: covariance capture and IPM / KPM inits vs Hugging Face `peft`.

References: the layer inputs captured by torch forward hooks on the same
tiny HF Llama (per-sample max-normalised covariance in numpy float64), and
PEFT's `preprocess_corda` + `corda_init` on that model and samples. SVD
signs are arbitrary per component, so the comparison is on sign-free
quantities: the residual base W − s·A B and the adapter product s·A B.
"""
import copy

import jax
import numpy as np
import pytest

from tests.models.conftest import VOCAB
from tunejax import models, tree
from tunejax.peft import calibrate, lora, peft_format

from tests.peft.common import make_method

R, ALPHA = 4, 8.0
TOKENS = np.random.RandomState(1).randint(3, VOCAB, (8, 16)).astype(np.int32)
TARGETS = r"layers/(attn/(q|o)|mlp/down)"
HF_NAMES = ("q_proj", "o_proj", "down_proj")


def _batch():
  return {"tokens": TOKENS, "segment_ids": np.ones_like(TOKENS),
          "loss_mask": np.ones(TOKENS.shape, np.float32)}


def test_covariance_is_max_normalised_per_sample(hf_llama):
  import torch  # pylint: disable=import-outside-toplevel
  model, _, cfg, params = hf_llama
  mod = "layers/mlp/down"
  got = []
  name = peft_format.hf_module_names(cfg, mod)[1]
  h = model.get_submodule(name).register_forward_hook(
      lambda _, inp, __: got.append(inp[0][0].double().numpy()))
  with torch.no_grad():
    for row in TOKENS:  # PEFT's CorDA sees one sample per forward
      model(torch.tensor(row[None]))
  h.remove()
  want = sum((x / abs(x.max())).T @ (x / abs(x.max())) for x in got)
  st = calibrate.collect(cfg, params, [_batch()], [mod], mode="corda")
  np.testing.assert_allclose(st[mod]["gram"][1], want, rtol=1e-5, atol=1e-5)
  assert float(st[mod]["count"][1]) == len(TOKENS)


@pytest.fixture(scope="module", params=["ipm", "kpm"])
def both(request, hf_llama):
  """(mode, tunejax method, trainable, frozen, PEFT model)."""
  import peft as hf_peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from peft.tuners.lora import corda as hf_corda  # pylint: disable=import-outside-toplevel
  model, _, cfg, params = hf_llama
  m = make_method(method="corda", rank=R, alpha=ALPHA, targets=(TARGETS,),
                  corda_mode=request.param)
  stats = m.collect_stats(cfg, params, [_batch()])
  ad, frozen = m.init(jax.random.PRNGKey(0), params, stats)

  hf = copy.deepcopy(model)
  pcfg = hf_peft.LoraConfig(
      r=R, lora_alpha=ALPHA, target_modules=list(HF_NAMES),
      init_lora_weights="corda",
      corda_config=hf_peft.tuners.lora.config.CordaConfig(corda_method=request.param))

  def run_model():
    for row in TOKENS:
      hf(torch.tensor(row[None]))
  hf_corda.preprocess_corda(hf, pcfg, run_model=run_model)
  pm = hf_peft.get_peft_model(hf, pcfg)
  return request.param, m, ad, frozen, pm


def test_matches_peft_corda(hf_llama, both):
  _, m, ad, frozen, pm = both
  cfg = hf_llama[2]
  fa, ff = tree.flatten(ad), tree.flatten(frozen)
  s = ALPHA / R
  for mod in m.targets(hf_llama[3]):
    for l, name in enumerate(peft_format.hf_module_names(cfg, mod)):
      layer = pm.get_submodule("base_model.model." + name)
      a_pt = layer.lora_A["default"].weight.detach().double().numpy()
      b_pt = layer.lora_B["default"].weight.detach().double().numpy()
      res_pt = layer.base_layer.weight.detach().double().numpy()
      a = np.asarray(fa[mod + "/lora_a"][l], np.float64)
      b = np.asarray(fa[mod + "/lora_b"][l], np.float64)
      delta = s * a @ b
      scale = np.abs(delta).max()
      np.testing.assert_allclose(delta.T, s * b_pt @ a_pt,
                                 atol=1e-4 * max(scale, 1.0), rtol=0)
      np.testing.assert_allclose(np.asarray(ff[mod + "/kernel"][l]).T,
                                 res_pt, atol=1e-4, rtol=0)
      # Same singular values per component: |A_i|·|B_i| agree.
      np.testing.assert_allclose(
          np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=1),
          np.linalg.norm(a_pt, axis=1) * np.linalg.norm(b_pt, axis=0),
          rtol=1e-3)


def test_residual_reconstructs_w_and_starts_at_base(hf_llama, both):
  mode, m, ad, frozen, _ = both
  _, _, cfg, params = hf_llama
  fa, ff, fp = (tree.flatten(x) for x in (ad, frozen, params))
  for mod, s in m._scales.items():
    a = np.asarray(fa[mod + "/lora_a"], np.float64)
    b = np.asarray(fa[mod + "/lora_b"], np.float64)
    w = np.asarray(fp[mod + "/kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(ff[mod + "/kernel"]) + s * a @ b,
                               w, atol=1e-5, rtol=0)
  tokens = TOKENS[:2]
  base_out = models.forward(cfg, params, tokens, seam=lora.LoraSeam())
  b_, a_ = m.assemble(ad, frozen)
  out = models.forward(cfg, b_, tokens, adapters=a_, seam=m.seam)
  np.testing.assert_allclose(out, base_out, atol=1e-4, rtol=0)
  rb, ra = m.reference(ad, frozen)
  np.testing.assert_allclose(
      models.forward(cfg, rb, tokens, adapters=ra, seam=m.seam), base_out,
      atol=1e-4, rtol=0)
  # IPM keeps the dominant directions: its adapter carries more of W.
  norm = sum(float(np.linalg.norm(np.asarray(fa[k]))) for k in fa
             if k.endswith("/lora_b"))
  assert norm > 0 and (mode == "ipm") == (norm > 1.0)
