"""MoE-LoRA (MixLoRA): routed FFN vs a numpy float64 reference, balance
loss vs its formula, E=1 equals plain LoRA, training through the step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import data, models, tree
from tunejax.peft import moe_lora
from tunejax.train import setup
from tests.peft.common import CFG, make_method
from tests.train.helpers import random_batch, tiny_config

E, K, R, S = 4, 2, 3, 2.0  # experts, top-k, rank, scale alpha/r


def _silu(x):
  return x / (1 + np.exp(-x))


def _np_mixlora_ffn(x, wg, wu, wd, ad):
  """Per token: softmax router, top-k renormalised, Σ w_e expert_e(x)."""
  f64 = lambda k, m: np.asarray(ad[m][k], np.float64)
  logits = x @ f64("router", "up")
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  y = np.zeros((x.shape[0], wd.shape[1]))
  for t in range(x.shape[0]):
    top = np.argsort(-p[t])[:K]
    w = p[t, top] / p[t, top].sum()
    for e, we in zip(top, w):
      lora = lambda m, base: base + S * f64("moe_a", m)[e] @ f64("moe_b", m)[e]
      g = x[t] @ lora("gate", wg)
      u = x[t] @ lora("up", wu)
      y[t] += we * ((_silu(g) * u) @ lora("down", wd))
  return y, p


def _experts(seed, d=8, f=12):
  rng = np.random.default_rng(seed)
  ad = {}
  for m, (i, o) in {"gate": (d, f), "up": (d, f), "down": (f, d)}.items():
    ad[m] = {"moe_a": rng.normal(size=(E, i, R)) * 0.3,
             "moe_b": rng.normal(size=(E, R, o)) * 0.3}
  ad["up"]["router"] = rng.normal(size=(d, E))
  w = {m: rng.normal(size=s) * 0.3 for m, s in
       {"gate": (d, f), "up": (d, f), "down": (f, d)}.items()}
  return rng.normal(size=(10, d)), w, ad


def test_seam_ffn_equals_numpy_mixlora():
  x, w, ad = _experts(0)
  seam = moe_lora.MoeLoraSeam(tuple((f"layers/mlp/{m}", S) for m in w),
                              0.0, K)
  j = lambda a: jnp.asarray(a, jnp.float32)
  jad = jax.tree.map(j, ad)
  lin = lambda m, inp: seam.linear(f"layers/mlp/{m}", inp, j(w[m]), None,
                                   jad[m])
  up, side = lin("up", j(x))
  hid = jax.nn.silu(lin("gate", j(x))) * up  # the model's FFN, unchanged
  y = lin("down", hid)
  want, p = _np_mixlora_ffn(x, w["gate"], w["up"], w["down"], ad)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(side["router_probs"]), p, atol=1e-6)
  top = np.argsort(-p, -1)[:, :K]
  mask = np.zeros_like(p)
  np.put_along_axis(mask, top, 1.0, -1)
  np.testing.assert_array_equal(np.asarray(side["router_topk"]), mask)


def test_balance_loss_equals_formula():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 5, E))  # [layers, B, L, E]
  seg = np.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2], [1, 1, 1, 1, 0]])
  probs, _, topk = moe_lora.route(jnp.asarray(logits), K)
  m = make_method(method="moe_lora", moe_experts=E, moe_top_k=K,
                  moe_aux_coef=0.01)
  pen, met = m.aux_loss({"mlp/up/router_probs": probs,
                         "mlp/up/router_topk": topk}, jnp.asarray(seg))
  # Switch / Mixtral: E · Σ_e f_e P_e over all layers' non-padding tokens.
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  keep = np.broadcast_to(seg > 0, p.shape[:-1])
  sel = np.argsort(-p, -1)[..., :K]
  hot = np.zeros_like(p)
  np.put_along_axis(hot, sel, 1.0, -1)
  f = hot[keep].mean(0)
  assert f.sum() == pytest.approx(K)
  want = E * np.sum(f * p[keep].mean(0))
  assert float(met["moe_balance"]) == pytest.approx(want, rel=1e-5)
  assert float(pen) == pytest.approx(0.01 * want, rel=1e-5)


def test_one_expert_top1_equals_plain_lora(base):
  params, tokens = base
  moe = make_method(method="moe_lora", rank=4, alpha=8.0, moe_experts=1,
                    moe_top_k=1)
  ad, frozen = jax.jit(moe.init)(jax.random.PRNGKey(2), params)
  ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
      jax.random.PRNGKey(3), x.shape), ad)
  plain = make_method(method="lora", rank=4, alpha=8.0)
  flat = tree.flatten(ad)
  lora_ad = {}
  for n, v in flat.items():
    if n.endswith("router"):
      continue
    n = n.replace("moe_a", "lora_a").replace("moe_b", "lora_b")
    lora_ad[n] = v[:, 0] if "/mlp/" in n else v  # drop the expert axis
  _, lora_frozen = jax.jit(plain.init)(jax.random.PRNGKey(2), params)
  hidden = jax.jit(models.hidden, static_argnames=("cfg", "seam",
                                                   "return_aux"))
  got, aux = hidden(cfg=CFG, params=frozen, tokens_BxL=tokens, adapters=ad,
                    seam=moe.seam, return_aux=True)
  want = hidden(cfg=CFG, params=lora_frozen, tokens_BxL=tokens,
                adapters=tree.unflatten(lora_ad), seam=plain.seam)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert aux["mlp/up/router_probs"].shape == (CFG.n_layers, *tokens.shape, 1)


def test_moe_lora_trains_and_logs_balance():
  cfg = tiny_config(peft={"method": "moe_lora", "rank": 4, "alpha": 8.0,
                          "moe_experts": 4, "moe_top_k": 2,
                          "moe_aux_coef": 0.01},
                    optim={"lr": 1e-2}, mesh={"data": 1})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  step = setup.jit_train_step(run, 2)  # micro-batches keep it token-weighted
  losses, bal = [], []
  for _ in range(5):
    b = data.to_global(random_batch(0), run.mesh, run.batch_sharding)
    state, met = step(state, b, jax.random.PRNGKey(0))
    losses.append(float(met["loss"]) - 0.01 * float(met["moe_balance"]))
    bal.append(float(met["moe_balance"]))
  assert losses[-1] < losses[0] - 0.05
  # E·Σ f P is 1 for perfectly uniform routing, at most E/k·k = E.
  assert all(0.9 < v < E for v in bal)
  names = set(tree.flatten(state.params))
  assert "layers/mlp/up/router" in names
  assert all(n.endswith(("lora_a", "lora_b", "moe_a", "moe_b", "router"))
             for n in names)
