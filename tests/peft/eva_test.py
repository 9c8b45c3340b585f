"""EVA: activation capture, PCA init, rank redistribution, trainer event.

References: the layer inputs captured by torch forward hooks on the same
tiny HF Llama (float64 Gram / PCA in numpy), and PEFT's
`get_eva_state_dict` on that model and batch. PEFT's incremental PCA uses
`torch.svd_lowrank` (randomised); the comparison swaps in its exact-SVD
mode (`lowrank=False`) so both sides compute the exact PCA. Components
are compared as vectors after aligning signs (both sides use svd_flip's
convention, the alignment only guards against ties).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.conftest import VOCAB
from tests.train.helpers import random_batch, tiny_config
from tunejax import models, tree
from tunejax.peft import calibrate, datadriven, peft_format
from tunejax.train import loop, setup

from tests.peft.common import make_method

R = 4
# Distinct inputs per target (q, k, v share one; tied ratios would make
# the boundary of the rank budget depend on sort tie-breaking).
TARGETS = r"layers/(attn/(q|o)|mlp/(up|down))"
HF_NAMES = ("q_proj", "o_proj", "up_proj", "down_proj")


def _batch(padded: bool):
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, VOCAB, (4, 16)).astype(np.int32)
  seg = np.ones_like(tokens)
  loss_mask = np.ones(tokens.shape, np.float32)
  if padded:
    seg[1, 11:] = 0
    seg[3, 5:] = 0
    loss_mask[:, :3] = 0  # a "prompt" outside the loss
  return {"tokens": tokens, "segment_ids": seg, "loss_mask": loss_mask * seg}


@pytest.fixture(scope="module")
def hf_inputs(hf_llama):
  """{(module, layer): [B, L, in] float64 inputs} from torch hooks."""
  import torch  # pylint: disable=import-outside-toplevel
  model, _, cfg, _ = hf_llama
  tokens = _batch(False)["tokens"]
  got, handles = {}, []
  for mod in ("layers/attn/q", "layers/attn/o", "layers/mlp/up",
              "layers/mlp/down"):
    for l, name in enumerate(peft_format.hf_module_names(cfg, mod)):
      def hook(_, inp, __, key=(mod, l)):
        got[key] = inp[0].detach().double().numpy()
      handles.append(model.get_submodule(name).register_forward_hook(hook))
  with torch.no_grad():
    model(torch.tensor(tokens))
  for h in handles:
    h.remove()
  return got


@pytest.mark.parametrize("label_mask", [False, True])
def test_stats_are_masked_gram_of_layer_inputs(hf_llama, hf_inputs,
                                               label_mask):
  _, _, cfg, params = hf_llama
  batch = _batch(True)
  # Two batches: the second is the first again, so sums double.
  st = calibrate.collect(cfg, params, [batch, batch], [m for m, _ in {
      k: 0 for k in hf_inputs}], label_mask=label_mask)
  mask = (batch["segment_ids"] > 0) & (
      (batch["loss_mask"] > 0) if label_mask else True)
  for (mod, l), x in hf_inputs.items():
    # Right padding: causal attention keeps the valid tokens' inputs equal
    # to HF's unpadded run.
    xm = x[mask]
    np.testing.assert_allclose(st[mod]["gram"][l], 2 * xm.T @ xm,
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st[mod]["sum"][l], 2 * xm.sum(0), rtol=1e-5,
                               atol=1e-4)
    assert float(st[mod]["count"][l]) == 2 * len(xm)


@pytest.fixture(scope="module")
def ours(hf_llama):
  _, _, cfg, params = hf_llama
  m = make_method(method="eva", rank=R, alpha=8.0, targets=(TARGETS,),
                  calib_label_mask=False)
  stats = m.collect_stats(cfg, params, [_batch(False)])
  ad, frozen = m.init(jax.random.PRNGKey(0), params, stats)
  return m, ad, frozen


def test_components_match_numpy_pca(hf_inputs, ours):
  m, ad, _ = ours
  fa = tree.flatten(ad)
  for (mod, l), x in hf_inputs.items():
    xc = x.reshape(-1, x.shape[-1])
    xc = xc - xc.mean(0)
    vt = np.linalg.svd(xc, full_matrices=False)[2]
    # svd_flip: each vector's largest-magnitude entry is positive.
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    a = np.asarray(fa[mod + "/lora_a"][l], np.float64)
    k = int(np.sum(np.any(a != 0, axis=0)))
    sign = np.sign(np.sum(a[:, :k] * vt[:k].T, axis=0))
    np.testing.assert_allclose(a[:, :k] * sign, vt[:k].T, atol=1e-4)
    np.testing.assert_array_equal(sign, 1)  # svd_flip convention


def test_matches_peft_eva(hf_llama, ours, monkeypatch):
  import peft as hf_peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from peft.tuners.lora import eva as hf_eva  # pylint: disable=import-outside-toplevel
  model, _, cfg, _ = hf_llama
  exact = hf_eva.IncrementalPCA
  monkeypatch.setattr(hf_eva, "IncrementalPCA",
                      lambda **kw: exact(**dict(kw, lowrank=False)))
  pcfg = hf_peft.LoraConfig(r=R, lora_alpha=8.0, target_modules=list(
      HF_NAMES), init_lora_weights="eva", eva_config=hf_peft.EvaConfig(
          rho=2.0))
  tokens = torch.tensor(_batch(False)["tokens"])
  sd = hf_eva.get_eva_state_dict(
      model, [{"input_ids": tokens, "attention_mask": torch.ones_like(
          tokens)}], pcfg, show_progress_bar=False)
  m, ad, _ = ours
  fa = tree.flatten(ad)
  ranks = {k: np.asarray(v) for k, v in m.ranks(ad).items()}
  total = 0
  for mod in m.targets(hf_llama[3]):
    for l, name in enumerate(peft_format.hf_module_names(cfg, mod)):
      u = sd[name].numpy().astype(np.float64)  # [rank, in]
      assert u.shape[0] == ranks[mod][l], (name, u.shape, ranks[mod][l])
      a = np.asarray(fa[mod + "/lora_a"][l], np.float64)[:, :u.shape[0]].T
      sign = np.sign(np.sum(a * u, axis=1, keepdims=True))
      np.testing.assert_allclose(a * sign, u, atol=1e-4)
      total += u.shape[0]
  assert total == R * len(HF_NAMES) * cfg.n_layers  # the whole budget


def test_rank_cap_scale_and_dead_columns(hf_llama, ours):
  _, _, cfg, _ = hf_llama
  m, ad, frozen = ours
  for mod, r in m.ranks(ad).items():
    assert int(jnp.max(r)) <= 2 * R
    assert m._scales[mod] == pytest.approx(8.0 / R)  # s = alpha / r kept
  tokens = jnp.asarray(_batch(False)["tokens"])

  def loss(t):
    b, a = m.assemble(t, frozen)
    return jnp.sum(jnp.sin(models.hidden(cfg, b, tokens, adapters=a,
                                         seam=m.seam)))
  grad = jax.jit(jax.grad(loss))
  # Two SGD steps: B leaves zero, then A moves; unused slots never do.
  t = ad
  for _ in range(2):
    t = jax.tree.map(lambda p, g: p - 0.1 * g, t, grad(t))
  ft = tree.flatten(t)
  for mod, r in m.ranks(ad).items():
    dead = np.arange(2 * R)[None, :] >= np.asarray(r)[:, None]  # [nl, R']
    a, b = np.asarray(ft[mod + "/lora_a"]), np.asarray(ft[mod + "/lora_b"])
    assert not np.any(a.transpose(0, 2, 1)[dead])
    assert not np.any(b[dead])
    assert np.any(b[~dead])


def test_on_start_event_calibrates_from_training_batches():
  cfg = tiny_config(total_steps=2, peft=dict(method="eva", rank=R,
                                             calib_batches=2),
                    mesh={"data": 1})
  model_cfg, params = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  batches = [random_batch(s) for s in (0, 1)]
  new = run.method.on_start(state, loop.event_context(cfg, run, iter(batches)))
  base = run.method._base(state.frozen)
  stats = calibrate.collect(model_cfg, base, batches,
                            run.method.targets(base), label_mask=True)
  want, _ = run.method.init(jax.random.PRNGKey(0), base, stats)
  for k, v in tree.flatten(want).items():
    np.testing.assert_allclose(tree.flatten(new.params)[k], v, atol=1e-6)
  assert isinstance(run.method, datadriven.Eva)
  # Fresh optimizer state over the new adapters, sharded as before.
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(
      state.opt_state)


@pytest.mark.parametrize("method", ["eva", "corda"])
def test_train_run_end_to_end(tmp_path, method):
  from tunejax import train  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(total_steps=2, peft=dict(method=method, rank=R,
                                             calib_batches=2),
                    mesh={"data": 1}, eval={"every": -1})
  out = train.run(cfg, str(tmp_path))
  assert np.isfinite(out["metrics"]["loss"])
  if method == "eva":  # calibrated: live ranks sum to the budget
    ranks = out["run"].method.ranks(out["state"].params)
    assert sum(int(jnp.sum(r)) for r in ranks.values()) == R * 7 * 2
