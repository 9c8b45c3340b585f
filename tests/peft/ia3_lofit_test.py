"""(IA)^3 and LoFiT: identity at init, forward == formula / folded weights,
head selection == numpy top-k, the L1 side output."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import models, tree
from tests.peft.common import CFG, make_method


@functools.partial(jax.jit, static_argnums=(2,))
def _fwd(base, ad, seam, tokens):
  return models.forward(CFG, base, tokens, adapters=ad, seam=seam)


def _random_like(t, seed, scale):
  flat = tree.flatten(t)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  return tree.unflatten({n: x + scale * jax.random.normal(k, x.shape, x.dtype)
                         for (n, x), k in zip(sorted(flat.items()), keys)})


def test_ia3_identity_then_folds_exactly(base):
  params, tokens = base
  m = make_method(method="ia3")
  t, f = m.init(jax.random.PRNGKey(0), params)
  ref = np.asarray(_fwd(params, None, None, tokens))
  # Multiplying by 1 is exact; XLA's fusion of the two graphs differs by
  # float32 rounding only (measured 1.2e-7).
  np.testing.assert_allclose(np.asarray(_fwd(*m.assemble(t, f), m.seam,
                                             tokens)), ref, atol=1e-6,
                             rtol=0)
  t = _random_like(t, 1, 0.3)
  out = np.asarray(_fwd(*m.assemble(t, f), m.seam, tokens))
  merged = m.merged(t, f)
  np.testing.assert_allclose(np.asarray(_fwd(merged, None, None, tokens)),
                             out, atol=1e-5, rtol=0)
  assert np.abs(out - ref).max() > 1e-3
  # The folding formula: k, v columns scaled (output), down rows (input).
  lay = lambda tr, *p: np.asarray(functools.reduce(
      lambda d, k: d[k], ("layers", *p), tr), np.float64)
  for mod, ff in (("attn/k", False), ("attn/v", False), ("mlp/down", True)):
    path = mod.split("/")
    w, l = lay(params, *path, "kernel"), lay(t, *path, "ia3")
    want = w * (l[:, :, None] if ff else l[:, None, :])
    np.testing.assert_allclose(lay(merged, *path, "kernel"), want, atol=1e-6)


def test_ia3_keys_after_rope(base):
  """Scales tied across each RoPE pair (i, i + K/2) commute with RoPE, so
  on a model without k-norm they equal the projection-side scales; the
  general form refuses to fold."""
  params, tokens = base
  pre = make_method(method="ia3", ia3_targets=(r"layers/attn/k",))
  post = make_method(method="ia3", ia3_targets=(r"layers/attn/k",),
                     ia3_k_after_rope=True)
  t_pre, f = pre.init(jax.random.PRNGKey(0), params)
  t_post, _ = post.init(jax.random.PRNGKey(0), params)
  g, k = CFG.n_kv_heads, CFG.head_dim
  half = 1 + 0.3 * jax.random.normal(jax.random.PRNGKey(4),
                                     (CFG.n_layers, g, k // 2))
  tied = jnp.concatenate([half, half], -1).reshape(CFG.n_layers, g * k)
  t_pre["layers"]["attn"]["k"]["ia3"] = tied
  t_post["layers"]["attn"]["k"]["ia3_rope"] = tied
  a = _fwd(*pre.assemble(t_pre, f), pre.seam, tokens)
  b = _fwd(*post.assemble(t_post, f), post.seam, tokens)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  with pytest.raises(Exception, match="do not fold"):
    post.merged(t_post, f)


def test_lofit_head_selection_equals_numpy():
  from tunejax.peft import lofit
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 4 * 8)).astype(np.float32)  # 3 layers, 4 heads
  want = np.sort(np.argsort(-np.linalg.norm(
      a.astype(np.float64).reshape(3, 4, 8), axis=-1).reshape(-1))[:5])
  np.testing.assert_array_equal(lofit.select_heads(jnp.asarray(a), 4, 5),
                                want)
  cfg1 = make_method(method="lofit").cfg
  cfg2 = lofit.phase2_config(
      cfg1, {"layers": {"attn": {"heads": {"lofit_scale": a}}}}, 4, 5)
  assert cfg2.lofit_phase == 2 and cfg2.lofit_heads == tuple(want)
  assert cfg2.lofit_head_dim == 8


def test_lofit_phase1_scales_and_l1(base):
  params, tokens = base
  m = make_method(method="lofit", lofit_l1=0.01)
  t, f = m.init(jax.random.PRNGKey(0), params)
  zero = jax.tree.map(jnp.zeros_like, t)
  np.testing.assert_allclose(
      np.asarray(_fwd(*m.assemble(zero, f), m.seam, tokens)),
      np.asarray(_fwd(params, None, None, tokens)), atol=1e-6, rtol=0)
  t = _random_like(t, 2, 0.2)
  out = _fwd(*m.assemble(t, f), m.seam, tokens)
  # (1 + A) ⊙ z before o == o's input rows scaled by (1 + A).
  np.testing.assert_allclose(
      np.asarray(_fwd(m.merged(t, f), None, None, tokens)), np.asarray(out),
      atol=1e-5, rtol=0)
  _, side = models.hidden(CFG, f, tokens, adapters=m.assemble(t, f)[1],
                          seam=m.seam, return_aux=True)
  penalty, metrics = m.aux_loss(side, None)
  a = np.asarray(t["layers"]["attn"]["heads"]["lofit_scale"], np.float64)
  np.testing.assert_allclose(float(penalty), 0.01 * np.abs(a).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["lofit_l1"]), np.abs(a).sum(),
                             rtol=1e-5)


def test_lofit_phase2_bias_equals_o_bias(base):
  """z_h + v_h on the selected heads == an o-projection bias v W_o."""
  params, tokens = base
  heads = (1, 6)  # layer 0 head 1, layer 1 head 2 (4 heads per layer)
  m = make_method(method="lofit", lofit_phase=2, lofit_heads=heads,
                  lofit_head_dim=CFG.head_dim)
  t, f = m.init(jax.random.PRNGKey(0), params)
  t = _random_like(t, 3, 0.5)
  out = _fwd(*m.assemble(t, f), m.seam, tokens)
  v = np.asarray(t["lofit"]["bias"], np.float64)
  k, h = CFG.head_dim, CFG.n_heads
  full = np.zeros((CFG.n_layers * h, k))
  full[list(heads)] = v
  w_o = np.asarray(params["layers"]["attn"]["o"]["kernel"], np.float64)
  bias = np.einsum("li,lid->ld", full.reshape(CFG.n_layers, h * k), w_o)
  with_bias = jax.tree.map(lambda x: x, params)
  with_bias["layers"]["attn"]["o"]["bias"] = jnp.asarray(bias, jnp.float32)
  np.testing.assert_allclose(
      np.asarray(_fwd(with_bias, None, None, tokens)), np.asarray(out),
      atol=1e-5, rtol=0)
  with pytest.raises(Exception, match="o projection bias"):
    m.merged(t, f)
  with pytest.raises(Exception, match="lofit_heads"):
    make_method(method="lofit", lofit_phase=2)
