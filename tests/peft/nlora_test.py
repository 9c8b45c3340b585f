"""SLoRA / NLoRA / IntTune (three-matrix LoRA) on the tiny preset.

References: numpy float64 Nyström approximation C W_rr⁺ R of each kernel
(stated on the PyTorch-layout weight W_pt = Wᵀ), the official code's
slices, and the defining identities (residual + adapter = W, merged ==
unmerged, IntTune trains only M).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import models, tree
from tunejax.peft import lora

from tests.peft.common import CFG, make_method

R, ALPHA = 4, 8.0
S = ALPHA / R


@functools.partial(jax.jit, static_argnums=0)
def _fwd(seam, params, adapters, tokens):
  return models.forward(CFG, params, tokens, adapters=adapters, seam=seam)


def _out(m, t, f, tokens):
  b, a = m.assemble(t, f)
  return np.asarray(_fwd(m.seam, b, a, tokens))


def _amb(fa, ff, mod):
  """float64 A, M, B of one module (IntTune keeps A, B frozen)."""
  get = lambda k: np.asarray(
      fa.get(f"{mod}/{k}", ff.get(f"peft/fixed/{mod}/{k}")), np.float64)
  return get("lora_a"), get("lora_mid"), get("lora_b")


def test_nystrom_init_matches_numpy(base):
  params, _ = base
  m = make_method(method="nlora", rank=R, alpha=ALPHA)
  ad, frozen = m.init(jax.random.PRNGKey(0), params)
  fp, fa, ff = (tree.flatten(x) for x in (params, ad, frozen))
  for mod in m.targets(params):
    w = np.asarray(fp[mod + "/kernel"], np.float64)
    a, mid, b = _amb(fa, ff, mod)
    for l in range(CFG.n_layers):
      w_pt = w[l].T  # [out, in]
      c, r_rows = w_pt[:, :R], w_pt[:R, :]
      nys_pt = c @ np.linalg.pinv(w_pt[:R, :R]) @ r_rows
      delta = S * a[l] @ mid[l] @ b[l]
      scale = np.abs(nys_pt).max()
      np.testing.assert_allclose(delta.T, nys_pt, atol=1e-5 * scale, rtol=0)
    res = np.asarray(ff[mod + "/kernel"], np.float64)
    np.testing.assert_allclose(res + S * a @ mid @ b, w, atol=1e-5 * np.abs(
        S * a @ mid @ b).max() + 1e-6, rtol=0)


def test_code_init_is_official_slices(base):
  params, tokens = base
  m = make_method(method="nlora", rank=R, alpha=ALPHA, nlora_init="code",
                  nlora_residual=False)
  ad, frozen = m.init(jax.random.PRNGKey(0), params)
  fp, fa, ff = (tree.flatten(x) for x in (params, ad, frozen))
  for mod in m.targets(params):
    w = np.asarray(fp[mod + "/kernel"])
    # A = W_pt[:r, :]ᵀ, B = W_pt[:, :r]ᵀ, M = W_pt[:r, :r]ᵀ (tunejax layout).
    np.testing.assert_array_equal(fa[mod + "/lora_a"], w[..., :, :R])
    np.testing.assert_array_equal(fa[mod + "/lora_b"], w[..., :R, :])
    np.testing.assert_array_equal(fa[mod + "/lora_mid"], w[..., :R, :R])
    np.testing.assert_array_equal(ff[mod + "/kernel"], w)
  # No residual: ΔW != 0 at init, the reference is the untouched base.
  ref = np.asarray(_fwd(lora.LoraSeam(), params, None, tokens))
  assert np.abs(_out(m, ad, frozen, tokens) - ref).max() > 1e-3
  rb, ra = m.reference(ad, frozen)
  np.testing.assert_array_equal(np.asarray(_fwd(m.seam, rb, ra, tokens)), ref)


@pytest.mark.parametrize("name", ["slora", "nlora", "inttune"])
def test_starts_at_base_and_merge_matches(base, name):
  params, tokens = base
  m = make_method(method=name, rank=R, alpha=ALPHA)
  ad, frozen = m.init(jax.random.PRNGKey(0), params)
  ref = np.asarray(_fwd(lora.LoraSeam(), params, None, tokens))
  tol = 0 if name == "slora" else 1e-4  # residual re-adds s·A M B (f32)
  np.testing.assert_allclose(_out(m, ad, frozen, tokens), ref, atol=tol,
                             rtol=0)
  rb, ra = m.reference(ad, frozen)
  np.testing.assert_allclose(np.asarray(_fwd(m.seam, rb, ra, tokens)), ref,
                             atol=tol, rtol=0)
  leaves, tdef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  ad = jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape)
                                 for x, k in zip(leaves, keys)])
  out = _out(m, ad, frozen, tokens)
  merged = np.asarray(_fwd(lora.LoraSeam(), m.merged(ad, frozen), None,
                           tokens))
  np.testing.assert_allclose(out, merged, atol=1e-4, rtol=0)
  assert np.abs(out - ref).max() > 1e-3


def test_inttune_trains_only_m(base):
  params, tokens = base
  m = make_method(method="inttune", rank=R, alpha=ALPHA)
  ad, frozen = m.init(jax.random.PRNGKey(0), params)
  names = set(tree.flatten(ad))
  assert names and all(n.endswith("/lora_mid") for n in names)
  nl = make_method(method="nlora", rank=R, alpha=ALPHA)
  ad_n, frozen_n = nl.init(jax.random.PRNGKey(0), params)
  for k, v in tree.flatten(ad_n).items():  # same factors, A/B now frozen
    src = tree.flatten(ad if k.endswith("/lora_mid") else frozen["peft"][
        "fixed"])
    np.testing.assert_array_equal(src[k], v)
  t_axes, f_axes = m.axes(models.param_axes(CFG))
  assert set(tree.flatten(t_axes, tree.is_axes)) == names
  assert set(tree.flatten(f_axes, tree.is_axes)) == set(tree.flatten(frozen))
  # Gradients flow to M through A·M.
  def loss(t):
    b, a = m.assemble(t, frozen)
    return jnp.sum(models.forward(CFG, b, tokens, adapters=a,
                                  seam=m.seam)[..., :8] ** 2)
  g = jax.grad(loss)(ad)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
