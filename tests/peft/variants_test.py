"""DoRA, PiSSA, OLoRA, VeRA and LoRA dropout on the tiny preset.

References: the methods' defining identities in numpy float64 (init is the
base model, residual + s·A B reconstructs W, merged == unmerged, DoRA's
column-norm formula) and the randomized SVD vs the exact one.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import config as config_lib, models, peft, tree
from tunejax.peft import lora, lowrank

from tests.peft.common import CFG, make_method as _method
ALL = ("lora", "rslora", "dora", "pissa", "olora", "vera")


@functools.partial(jax.jit, static_argnums=0)
def _fwd(seam, params, adapters, tokens):
  return models.forward(CFG, params, tokens, adapters=adapters, seam=seam)


def _out(m, ad, frozen, tokens, rng=None):
  p, a = m.assemble(ad, frozen, rng)
  return np.asarray(_fwd(m.seam, p, a, tokens))


def _perturb(ad, seed=3):
  leaves, tdef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tdef, [
      x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", ALL)
def test_init_is_base_and_merge_matches(base, name):
  params, tokens = base
  m = _method(method=name, rank=4, alpha=8.0)
  ad, frozen = m.init(jax.random.PRNGKey(2), params)
  ref = np.asarray(_fwd(lora.LoraSeam(), params, None, tokens))
  # Exact for B = 0; VeRA (lambda_b = 0) and DoRA's m / ||W||_c is 1 to an ulp; the
  # residual inits re-add s·A B in float32, so they agree to its rounding.
  tol = {"pissa": 2e-5, "olora": 2e-5, "dora": 1e-6, "vera": 1e-6}.get(
      name, 0)
  np.testing.assert_allclose(_out(m, ad, frozen, tokens), ref, atol=tol,
                             rtol=0)
  # The reference model (adapters off / initial adapters) is the base.
  rp, ra = m.reference(ad, frozen)
  np.testing.assert_allclose(np.asarray(_fwd(m.seam, rp, ra, tokens)), ref,
                             atol=tol, rtol=0)
  ad = _perturb(ad)
  out = _out(m, ad, frozen, tokens)
  merged = np.asarray(_fwd(lora.LoraSeam(), m.merged(ad, frozen), None,
                           tokens))
  np.testing.assert_allclose(out, merged, atol=1e-5, rtol=0)
  assert np.abs(out - ref).max() > 1e-3


@pytest.mark.parametrize("name,niter", [("pissa", 0), ("pissa", 4),
                                        ("olora", 0)])
def test_residual_reconstructs_w(base, name, niter):
  params, _ = base
  m = _method(method=name, rank=4, alpha=8.0, svd_niter=niter)
  ad, frozen = m.init(jax.random.PRNGKey(2), params)
  fa, ff, fp = tree.flatten(ad), tree.flatten(frozen), tree.flatten(params)
  for mod in m.targets(params):
    a = np.asarray(fa[mod + "/lora_a"], np.float64)
    b = np.asarray(fa[mod + "/lora_b"], np.float64)
    w = np.asarray(fp[mod + "/kernel"], np.float64)
    res = np.asarray(ff[mod + "/kernel"], np.float64)
    np.testing.assert_allclose(res + 2.0 * a @ b, w, atol=1e-6, rtol=0)
    if name == "olora":  # B rows orthonormal (B = Q_r^T).
      eye = np.broadcast_to(np.eye(4), b.shape[:-2] + (4, 4))
      np.testing.assert_allclose(b @ np.swapaxes(b, -1, -2), eye, atol=1e-5)
    elif niter == 0:  # A B is W's best rank-r approximation (Eckart-Young).
      u, s, vt = np.linalg.svd(w, full_matrices=False)
      best = (u[..., :4] * s[..., None, :4]) @ vt[..., :4, :]
      np.testing.assert_allclose(2.0 * a @ b, best, atol=1e-5, rtol=0)


def test_randomized_svd_finds_dominant_subspace():
  rng = np.random.RandomState(0)
  u, _ = np.linalg.qr(rng.randn(48, 48))
  v, _ = np.linalg.qr(rng.randn(32, 32))
  s = np.r_[np.linspace(10, 5, 4), 0.05 * rng.rand(28)]
  w = (u[:, :32] * s) @ v.T
  _, s_hat, _ = lowrank.randomized_svd(jax.random.PRNGKey(0),
                                       jnp.asarray(w, jnp.float32), 4, 2)
  np.testing.assert_allclose(np.asarray(s_hat), s[:4], rtol=1e-4)


def test_dora_formula(base):
  """y = (x W + s x A B) · m / ||W + s A B||_c, in float64."""
  rng = np.random.RandomState(0)
  x, w = rng.randn(3, 8), rng.randn(8, 6)
  ad = {"lora_a": rng.randn(8, 2), "lora_b": rng.randn(2, 6),
        "magnitude": rng.rand(6) + 0.5}
  seam = lora.LoraSeam(scales=(("m", 1.5),))
  got = seam.linear("m", jnp.asarray(x, jnp.float32), jnp.asarray(w),
                    None, {k: jnp.asarray(v) for k, v in ad.items()})
  wf = w + 1.5 * ad["lora_a"] @ ad["lora_b"]
  ref = x @ wf * ad["magnitude"] / np.linalg.norm(wf, axis=0)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  # The norm is detached: d/dA flows only through the direction term.
  def f(a):
    return seam.linear("m", jnp.asarray(x, jnp.float32), jnp.asarray(w),
                       None, dict(ad, lora_a=a)).sum()
  g = np.asarray(jax.grad(f)(jnp.asarray(ad["lora_a"], jnp.float32)))
  scale = ad["magnitude"] / np.linalg.norm(wf, axis=0)
  ref_g = 1.5 * x.T @ np.ones((3, 6)) @ (ad["lora_b"] * scale).T
  np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-4)


def test_dropout_uses_step_rng_only(base):
  params, tokens = base
  m = _method(method="lora", rank=4, alpha=8.0, dropout=0.5)
  ad, frozen = _perturb(m.init(jax.random.PRNGKey(2), params)[0]), \
      m.init(jax.random.PRNGKey(2), params)[1]
  plain = _method(method="lora", rank=4, alpha=8.0)
  plain.init(jax.random.PRNGKey(2), params)
  ref = _out(plain, ad, frozen, tokens)
  np.testing.assert_array_equal(_out(m, ad, frozen, tokens), ref)  # no rng
  k = jax.random.PRNGKey(7)
  d1, d2 = _out(m, ad, frozen, tokens, k), _out(m, ad, frozen, tokens, k)
  np.testing.assert_array_equal(d1, d2)  # deterministic given the rng
  assert np.abs(d1 - ref).max() > 1e-3
  assert np.abs(_out(m, ad, frozen, tokens, jax.random.PRNGKey(8)) - d1
                ).max() > 1e-4


def test_dropout_formula():
  """x W + s·(drop(x) A) B with PEFT's inverted dropout (scale 1/(1-p))."""
  rng = np.random.RandomState(1)
  x, w = rng.randn(4, 8).astype(np.float32), rng.randn(8, 5)
  a, b = rng.randn(8, 2), rng.randn(2, 5)
  key = jax.random.PRNGKey(3)
  seam = lora.LoraSeam(scales=(("m", 2.0),), dropout=0.25)
  got = seam.linear("m", jnp.asarray(x), jnp.asarray(w, jnp.float32), None,
                    {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b),
                     "dropout_key": key})
  keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
  xd = np.where(keep, x / 0.75, 0.0)
  np.testing.assert_allclose(np.asarray(got), x @ w + 2.0 * xd @ a @ b,
                             rtol=1e-5, atol=1e-5)


def test_loraplus_scales_b_lr(base):
  from tunejax import optim
  params, _ = base
  ad, _ = _method(method="lora", rank=4).init(jax.random.PRNGKey(2), params)
  ocfg = config_lib.build(optim.OptimConfig, dict(
      name="sgd", lr=0.1, schedule="constant", warmup_steps=0, clip_norm=0.0,
      lr_groups=peft.loraplus_lr_groups(16.0)), "optim")
  tx, _ = optim.make_tx(ocfg, ad, 10)
  grads = jax.tree.map(jnp.ones_like, ad)
  upd = tree.flatten(tx.update(grads, tx.init(ad), ad)[0])
  q = "layers/attn/q/"
  np.testing.assert_allclose(np.asarray(upd[q + "lora_b"]), -1.6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(upd[q + "lora_a"]), -0.1, rtol=1e-6)
