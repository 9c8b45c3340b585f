"""Soft prompt, prefix tuning, DePT: model-level equalities and generation.

References: the base model run on explicit [prompt ids; text] (soft prompt
from text), separate per-document runs (packing), numpy float64 (DePT's
embedding update), and a cache-free greedy loop (generation).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import models
from tests.peft.common import make_method

# tiny: Llama-like; tiny-gemma3: k-norm, embedding scale, window 8.
GEMMA = "tiny-gemma3"


@pytest.fixture(scope="module")
def presets():
  out = {}
  for name in ("tiny", GEMMA):
    cfg = models.preset(name)
    out[name] = cfg, models.init(cfg, jax.random.PRNGKey(0))
  return out


def _assembled(method, params, seed=2, perturb=0.0):
  t, f = method.init(jax.random.PRNGKey(seed), params)
  if perturb:  # non-trivial values for every trainable leaf
    leaves, tdef = jax.tree.flatten(t)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    t = tdef.unflatten([x + perturb * jax.random.normal(k, x.shape, x.dtype)
                        for x, k in zip(leaves, keys)])
  return (*method.assemble(t, f), t, f)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_hidden(cfg, base, ad, seam, tokens, pos, seg):
  return models.hidden(cfg, base, tokens, pos, seg, adapters=ad, seam=seam)


def _hidden(cfg, base, ad, seam, tokens, pos=None, seg=None):
  return np.asarray(_jit_hidden(cfg, base, ad, seam, jnp.asarray(tokens),
                                pos, seg))


def test_text_init_prompt_equals_prepended_tokens(presets):
  """Real-token states == the base model on [prompt ids; text] (repeated
  text ids fill n_virtual, as PEFT's TEXT init)."""
  cfg, params = presets[GEMMA]
  ids = (7, 9, 11)
  m = make_method(method="prompt", n_virtual=5, prompt_init="text",
                  prompt_init_ids=ids)
  base, ad, _, _ = _assembled(m, params)
  text = np.random.default_rng(0).integers(3, 256, (2, 6))
  got = _hidden(cfg, base, ad, m.seam, text)
  full = np.concatenate([np.tile([7, 9, 11, 7, 9], (2, 1)), text], axis=1)
  want = _hidden(cfg, params, None, None, full)[:, 5:]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def _packed_case():
  """Two documents (lengths 7 and 4) packed into one row + 1 padding."""
  rng = np.random.default_rng(3)
  d1, d2 = rng.integers(3, 256, 7), rng.integers(3, 256, 4)
  tokens = np.concatenate([d1, d2, [0]])[None]
  seg = np.array([[1] * 7 + [2] * 4 + [0]], np.int32)
  pos = np.array([list(range(7)) + list(range(4)) + [0]], np.int32)
  return d1, d2, tokens, pos, seg


@pytest.mark.parametrize("preset,kw", [
    (GEMMA, dict(method="prompt", n_virtual=3)),
    ("tiny", dict(method="dept", n_virtual=3, dept_max_len=5)),
    (GEMMA, dict(method="prefix", n_virtual=3)),
    ("tiny", dict(method="prefix", n_virtual=3, prefix_projection=8,
                  prefix_shift_positions=False)),
], ids=["prompt", "dept", "prefix", "prefix_mlp"])
def test_packed_equals_separate_documents(presets, preset, kw):
  """Every packed document sees the shared virtual tokens exactly as when
  run alone (one right-padded row each); padding stays finite."""
  cfg, params = presets[preset]
  m = make_method(**kw)
  base, ad, _, _ = _assembled(m, params, perturb=0.05)
  d1, d2, tokens, pos, seg = _packed_case()
  packed = _hidden(cfg, base, ad, m.seam, tokens, jnp.asarray(pos),
                   jnp.asarray(seg))
  assert packed.shape == (1, 12, cfg.d_model) and np.isfinite(packed).all()
  alone_tokens = np.zeros((2, 12), np.int64)
  alone_tokens[0, :7], alone_tokens[1, :4] = d1, d2
  alone_seg = (np.arange(12) < np.array([[7], [4]])).astype(np.int32)
  alone = _hidden(cfg, base, ad, m.seam, alone_tokens, None,
                  jnp.asarray(alone_seg))
  np.testing.assert_allclose(packed[0, :7], alone[0, :7], atol=2e-5, rtol=0)
  np.testing.assert_allclose(packed[0, 7:11], alone[1, :4], atol=2e-5,
                             rtol=0)
  # The virtual tokens matter (not silently dropped): other values differ.
  other = jax.tree.map(lambda x: x + 0.5, ad)
  moved = _hidden(cfg, base, other, m.seam, tokens, jnp.asarray(pos),
                  jnp.asarray(seg))
  assert np.abs(packed[:, :11] - moved[:, :11]).max() > 1e-3


def test_dept_embedding_update_equals_formula(presets):
  cfg, params = presets["tiny"]
  m = make_method(method="dept", n_virtual=2, dept_rank=4, dept_alpha=6.0,
                  dept_max_len=5)
  _, ad, t, _ = _assembled(m, params, perturb=0.1)
  table = params["embed"]["embedding"]
  tokens = np.random.default_rng(1).integers(3, 256, (2, 7))
  pos = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]], np.int32)
  x = jnp.take(table, jnp.asarray(tokens), axis=0)
  got, virtual = m.seam.prompt(x, jnp.asarray(pos), ad["prompt"])
  a = np.asarray(t["prompt"]["dept_a"], np.float64)
  b = np.asarray(t["prompt"]["dept_b"], np.float64)
  delta = 6.0 / np.sqrt(4) * (a @ b)  # [max_len, D]
  want = np.asarray(x, np.float64) + np.where(
      (pos < 5)[..., None], delta[np.minimum(pos, 4)], 0.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(virtual),
                                np.asarray(t["prompt"]["embedding"]))
  # B = 0 (the init): DePT is exactly the soft prompt it carries.
  t0, f0 = m.init(jax.random.PRNGKey(5), params)
  sp = make_method(method="prompt", n_virtual=2)
  h_dept = _hidden(cfg, *m.assemble(t0, f0), m.seam, tokens)
  h_sp = _hidden(cfg, *sp.assemble({"prompt": {
      "embedding": t0["prompt"]["embedding"]}}, f0), sp.seam, tokens)
  np.testing.assert_array_equal(h_dept, h_sp)


def test_prefix_projection_layout(presets):
  """The MLP output is read in PEFT's [P, n_layers, 2, G·K] layout."""
  cfg, params = presets["tiny"]
  m = make_method(method="prefix", n_virtual=3, prefix_projection=8)
  _, ad, t, _ = _assembled(m, params, perturb=0.1)
  p = {k: np.asarray(v, np.float64) for k, v in t["prefix"].items()}
  flat = np.tanh(p["embedding"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  gk = cfg.n_kv_heads * cfg.head_dim
  kv = flat.reshape(3, cfg.n_layers, 2, gk)
  np.testing.assert_allclose(np.asarray(ad["prefix"]["k"]),
                             kv[:, :, 0].transpose(1, 0, 2), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ad["prefix"]["v"]),
                             kv[:, :, 1].transpose(1, 0, 2), atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(method="prompt", n_virtual=3),
    dict(method="prefix", n_virtual=3),
], ids=["prompt", "prefix"])
def test_generate_with_virtual_tokens(presets, kw):
  """KV-cache generation of a left-padded batch == the cache-free forward
  on prompt + generated tokens (greedy argmax and log-probs)."""
  cfg, params = presets[GEMMA]
  m = make_method(**kw)
  base, ad, _, _ = _assembled(m, params, perturb=0.5)
  prompts = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14]]
  out = models.generate(cfg, base, prompts, 4, adapters=ad, seam=m.seam,
                        eos_id=-1)
  w = models.unembedding(cfg, base)
  for i, p in enumerate(prompts):
    new = list(np.asarray(out.tokens_BxT[i]))
    h = _hidden(cfg, base, ad, m.seam, np.array([p + new]))
    logits = np.asarray(h[0, len(p) - 1:-1], np.float64) @ np.asarray(
        w, np.float64)
    assert list(logits.argmax(-1)) == new
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + \
        logits.max(-1)
    np.testing.assert_allclose(np.asarray(out.logps_BxT[i]),
                               logits.max(-1) - lse, atol=1e-4)


def test_merged_is_refused_and_reference_is_base(base):
  params, tokens = base
  m = make_method(method="prompt", n_virtual=2)
  t, f = m.init(jax.random.PRNGKey(0), params)
  with pytest.raises(Exception, match="no merged checkpoint"):
    m.merged(t, f)
  ref_params, ref_ad = m.reference(t, f)
  assert ref_ad is None and ref_params is f
  with pytest.raises(Exception, match="prompt_init_text"):
    make_method(method="prompt", prompt_init="text").init(
        jax.random.PRNGKey(0), params)
