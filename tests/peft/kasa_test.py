"""KaSA: truncation, regulariser and forward vs Hugging Face `peft`.

References: numpy float64 SVD (the truncated base + the dropped r smallest
components rebuild W), the regulariser's formula in numpy float64 (both
orientations and reductions), and PEFT's `KasaLinearVariant` forward and
`_get_kasa_loss` on a tiny random Llama with identical A, B, d.
"""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import models, tree
from tunejax.peft import lora, peft_format

from tests.peft.common import CFG, make_method

R = 4


@functools.partial(jax.jit, static_argnums=(0, 1))
def _hidden_aux(cfg, seam, params, adapters, tokens):
  return models.hidden(cfg, params, tokens, adapters=adapters, seam=seam,
                       return_aux=True)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fwd(cfg, seam, params, adapters, tokens):
  return models.forward(cfg, params, tokens, adapters=adapters, seam=seam)


def _perturbed(m, params, seed=2):
  ad, frozen = m.init(jax.random.PRNGKey(seed), params)
  leaves, tdef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tdef, [
      x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)]), frozen


def test_truncated_base_plus_dropped_components_is_w(base):
  params, _ = base
  m = make_method(method="kasa", rank=R, alpha=8.0)
  ad, frozen = m.init(jax.random.PRNGKey(2), params)
  fp, ff, fa = (tree.flatten(x) for x in (params, frozen, ad))
  for mod in m.targets(params):
    w = np.asarray(fp[mod + "/kernel"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = s.shape[-1] - R
    dropped = (u[..., :, k:] * s[..., None, k:]) @ vt[..., k:, :]
    res = np.asarray(ff[mod + "/kernel"], np.float64)
    np.testing.assert_allclose(res + dropped, w, atol=2e-6, rtol=0)
    # The base really lost its r smallest components (rank k).
    s_res = np.linalg.svd(res, compute_uv=False)
    assert np.abs(s_res[..., k:]).max() < 1e-5
    np.testing.assert_allclose(s_res[..., :k], s[..., :k], rtol=1e-5)
    # B = 0: the model starts at the truncated base.
    assert not np.any(np.asarray(fa[mod + "/lora_b"]))


def test_init_output_and_merge(base):
  params, tokens = base
  m = make_method(method="kasa", rank=R, alpha=8.0)
  ad, frozen = m.init(jax.random.PRNGKey(2), params)
  plain = lora.LoraSeam()
  ref = np.asarray(_fwd(CFG, plain, m.reference(ad, frozen)[0], None, tokens))
  b, a = m.assemble(ad, frozen)
  np.testing.assert_array_equal(np.asarray(_fwd(CFG, m.seam, b, a, tokens)),
                                ref)
  ad, frozen = _perturbed(m, params)
  b, a = m.assemble(ad, frozen)
  out = np.asarray(_fwd(CFG, m.seam, b, a, tokens))
  merged = np.asarray(_fwd(CFG, plain, m.merged(ad, frozen), None, tokens))
  np.testing.assert_allclose(out, merged, atol=1e-5, rtol=0)
  assert np.abs(out - ref).max() > 1e-3


def _reg_np(a, b, d, beta, gamma, orth):
  a, b, d = (np.asarray(x, np.float64) for x in (a, b, d))
  ga, gb = (a.T @ a, b @ b.T) if orth == "rank" else (a @ a.T, b.T @ b)
  off = lambda g: np.linalg.norm(g - np.eye(g.shape[0]))
  return beta * np.sum(d ** 2) + gamma * (off(ga) + off(gb))


@pytest.mark.parametrize("orth,reduce", [("rank", "mean"), ("full", "sum")])
def test_regulariser_matches_formula(base, orth, reduce):
  params, tokens = base
  m = make_method(method="kasa", rank=R, alpha=8.0, kasa_beta=0.3,
                  kasa_gamma=0.7, kasa_orth=orth, kasa_reduce=reduce)
  ad, frozen = _perturbed(m, params)
  b, a = m.assemble(ad, frozen)
  _, side = _hidden_aux(CFG, m.seam, b, a, tokens)
  pen, metrics = m.aux_loss(side, None)
  fa = tree.flatten(ad)
  terms = [_reg_np(fa[f"{mod}/lora_a"][l], fa[f"{mod}/lora_b"][l],
                   fa[f"{mod}/lora_diag"][l], 0.3, 0.7, orth)
           for mod in m.targets(params) for l in range(CFG.n_layers)]
  want = np.mean(terms) if reduce == "mean" else np.sum(terms)
  np.testing.assert_allclose(float(pen), want, rtol=1e-5)
  assert float(metrics["kasa_reg"]) == float(pen)
  # The penalty's gradient reaches every trainable leaf (d, A and B).
  def penalty(t):
    bb, aa = m.assemble(t, frozen)
    return m.aux_loss(models.hidden(CFG, bb, tokens, adapters=aa,
                                    seam=m.seam, return_aux=True)[1],
                      None)[0]
  g = tree.flatten(jax.grad(penalty)(ad))
  assert all(float(jnp.abs(v).max()) > 0 for v in g.values())


def test_forward_and_loss_match_peft(hf_llama):
  import peft as hf_peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from tests.models.conftest import VOCAB, hf_logits  # pylint: disable=import-outside-toplevel
  model, _, cfg, params = hf_llama
  m = make_method(method="kasa", rank=R, alpha=8.0,
                  targets=(r"layers/(attn/(q|v)|mlp/down)",),
                  kasa_reduce="sum")
  ad, frozen = _perturbed(m, params)
  tokens = np.random.RandomState(0).randint(3, VOCAB, (2, 16))
  b, a = m.assemble(ad, frozen)
  ours = np.asarray(_fwd(cfg, m.seam, b, a, jnp.asarray(tokens)))
  _, side = _hidden_aux(cfg, m.seam, b, a, jnp.asarray(tokens))
  pen = float(m.aux_loss(side, None)[0])

  pm = hf_peft.get_peft_model(copy.deepcopy(model), hf_peft.LoraConfig(
      r=R, lora_alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"],
      kasa_config=hf_peft.tuners.lora.KasaConfig()))
  fa = tree.flatten(ad)
  with torch.no_grad():
    for mod in m.targets(params):
      for l, name in enumerate(peft_format.hf_module_names(cfg, mod)):
        layer = pm.get_submodule("base_model.model." + name)
        t = lambda k: torch.tensor(np.asarray(fa[f"{mod}/{k}"][l]))
        layer.lora_A["default"].weight.copy_(t("lora_a").T)
        layer.lora_B["default"].weight.copy_(t("lora_b").T)
        layer.lora_diag["default"].copy_(t("lora_diag"))
  np.testing.assert_allclose(ours, hf_logits(pm, tokens), atol=1e-4, rtol=0)
  np.testing.assert_allclose(pen, float(pm.base_model._get_kasa_loss()),
                             rtol=1e-5)


def test_regulariser_reaches_the_train_step():
  """The step's loss is CE + the KaSA penalty: with the regulariser on,
  the first step's loss exceeds the off run's by exactly `kasa_reg`."""
  from tunejax import data  # pylint: disable=import-outside-toplevel
  from tunejax.train import setup  # pylint: disable=import-outside-toplevel
  from tests.train.helpers import random_batch, tiny_config  # pylint: disable=import-outside-toplevel
  batch = random_batch(0)
  out = {}
  for on in (True, False):
    cfg = tiny_config(peft={"method": "kasa", "rank": 2,
                            "kasa_beta": 0.1 if on else 0.0,
                            "kasa_gamma": 0.2 if on else 0.0},
                      mesh={"data": 1})
    model_cfg, params = setup.load_model(cfg.model)
    state, run = setup.build(cfg, model_cfg, params)
    step = setup.jit_train_step(run, 1)
    _, m = step(state, data.to_global(batch, run.mesh, run.batch_sharding),
                jax.random.PRNGKey(0))
    out[on] = {k: float(v) for k, v in m.items()}
  assert out[True]["kasa_reg"] > 1e-3
  np.testing.assert_allclose(out[True]["loss"] - out[False]["loss"],
                             out[True]["kasa_reg"], rtol=1e-4)
