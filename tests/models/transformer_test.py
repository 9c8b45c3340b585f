"""Model internals: packing, the PEFT seam, scan/loop/remat, sharding, axes.

References are independent computations: separate runs per document,
weight-merged equivalents of seam adapters, float64 numpy formulas.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import errors, sharding
from tunejax import models
from tunejax.models import Seam

TINY_GEMMA = models.preset("tiny-gemma3")
TINY = models.preset("tiny")
_fwd = jax.jit(models.forward, static_argnums=0, static_argnames="seam")


@pytest.fixture(scope="module")
def nets():
  return {name: (c, models.init(c, jax.random.key(i)))
          for i, (name, c) in enumerate(
              [("llama", TINY), ("gemma3", TINY_GEMMA)])}


def _rand_like_tree(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape)
                            for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_row_equals_separate_documents(family, nets):
  cfg, params = nets[family]
  params = _rand_like_tree(params, jax.random.key(7), 0.05)
  lengths = (9, 14, 9)  # Each longer than the gemma3 window (8).
  docs = [np.random.RandomState(i).randint(3, 256, (1, n))
          for i, n in enumerate(lengths)]
  tokens = np.concatenate(docs, axis=1)
  segs = np.concatenate([np.full((1, n), i + 1) for i, n in
                         enumerate(lengths)], axis=1)
  pos = np.concatenate([np.arange(n)[None] for n in lengths], axis=1)
  packed = np.asarray(_fwd(cfg, params, jnp.asarray(tokens),
                                     jnp.asarray(pos), jnp.asarray(segs)))
  start = 0
  for doc, n in zip(docs, lengths):
    alone = np.asarray(_fwd(cfg, params, jnp.asarray(doc)))
    np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5,
                               rtol=0)
    start += n


@dataclasses.dataclass(frozen=True)
class _AddSeam(Seam):
  """Test seam: LoRA-style x@A@B on linears, scales at hooks, embed delta."""

  def linear(self, name, x, kernel, bias, adapters):
    y = super().linear(name, x, kernel, bias, adapters)
    if "a" in adapters:
      y = y + x @ adapters["a"] @ adapters["b"]
    return y

  def embed(self, tokens, table, adapters):
    return super().embed(tokens, table + adapters.get("delta", 0.0), {})

  def act(self, name, x, adapters):
    return x * adapters["scale"] if "scale" in adapters else x


def test_seam_matches_merged_weights(nets):
  cfg, params = nets["gemma3"]
  n, d, r, k = cfg.n_layers, cfg.d_model, 3, cfg.head_dim
  g, h, f = cfg.n_kv_heads, cfg.n_heads, cfg.mlp_dim
  rs = np.random.RandomState(0)
  rnd = lambda *s: jnp.asarray(rs.normal(0, 0.1, s), jnp.float32)
  # 'attn/k' acts after k-norm and RoPE; a per-layer scale equal on both
  # rotary halves commutes with the rotation, so it equals scaling the
  # (1 + w) k-norm multiplier.
  k_half = 1 + rnd(n, 1, k // 2)
  adapters = {
      "embed": {"delta": rnd(cfg.vocab_size, d)},
      "layers": {
          "attn": {"q": {"a": rnd(n, d, r), "b": rnd(n, r, h * k)},
                   "k": {"scale": jnp.concatenate([k_half, k_half], -1)},
                   "v": {"scale": 1 + rnd(n, g, k)},
                   "heads": {"scale": 1 + rnd(n, h, k)}},
          "mlp": {"down": {"a": rnd(n, f, r), "b": rnd(n, r, d)},
                  "hidden": {"scale": 1 + rnd(n, f)}}}}
  lay = adapters["layers"]
  merged = jax.tree.map(lambda x: x, params)
  at, mp = merged["layers"]["attn"], merged["layers"]["mlp"]
  merged["embed"]["embedding"] += adapters["embed"]["delta"]
  at["q"]["kernel"] += lay["attn"]["q"]["a"] @ lay["attn"]["q"]["b"]
  kn = at["k_norm"]
  kn["scale"] = (1 + kn["scale"]) * lay["attn"]["k"]["scale"][:, 0] - 1
  at["v"]["kernel"] *= lay["attn"]["v"]["scale"].reshape(n, 1, g * k)
  at["o"]["kernel"] *= lay["attn"]["heads"]["scale"].reshape(n, h * k, 1)
  # The hook scales the down projection's input, LoRA path included.
  mp["down"]["kernel"] = ((mp["down"]["kernel"]
                           + lay["mlp"]["down"]["a"] @ lay["mlp"]["down"]["b"])
                          * lay["mlp"]["hidden"]["scale"][:, :, None])
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 20)))
  got = _fwd(cfg, params, tokens, adapters=adapters, seam=_AddSeam())
  # The embedding is tied; the seam's embed delta does not touch the
  # unembedding, so the reference uses the original one.
  want = models.hidden(cfg, merged, tokens) @ models.unembedding(cfg, params)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # The tied unembedding is not adapted: a LoRA on the hidden path changes
  # logits, the empty seam on plain params does not.
  plain = models.forward(cfg, params, tokens, seam=_AddSeam())
  np.testing.assert_array_equal(plain, models.forward(cfg, params, tokens))


def test_scan_loop_and_remat_agree(nets):
  cfg, params = nets["gemma3"]
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 256, (2, 16)))

  def loss(p, c):
    return jnp.mean(models.forward(c, p, tokens) ** 2)

  vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  base = vg(params, cfg.replace(scan_layers=False))
  for remat in ("full", "save_dots"):
    got = vg(params, cfg.replace(remat=remat))
    np.testing.assert_allclose(got[0], base[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(base[1])):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family,scan", [("llama", False), ("gemma3", True)])
def test_rope_tables_computed_once_in_the_step(nets, family, scan):
  """XLA:CPU fused the tables' sin/cos into every consumer, recomputing them
  per head and per use (W1: 6% of the step). Compiled value-and-grad: every
  sin/cos is table-shaped [B, L, K], one per table (Gemma 3: two)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the tables are materialised on XLA:CPU only")
  cfg, params = nets[family]
  cfg = cfg.replace(scan_layers=scan)
  tokens = jnp.zeros((2, 16), jnp.int32)
  loss = lambda p: jnp.mean(models.forward(cfg, p, tokens) ** 2)
  hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
  shapes = [m for op in ("cosine", "sine")
            for m in re.findall(
                rf"= (f32\[[\d,]*\])\S* {op}\(", hlo)]
  n_tables = 2 if "local" in cfg.layer_types else 1
  assert sorted(shapes) == [f"f32[2,16,{cfg.head_dim}]"] * (2 * n_tables)


@dataclasses.dataclass(frozen=True)
class _TapSeam(Seam):
  """Reports each input's sum of squares as a side output."""

  def linear(self, name, x, kernel, bias, adapters):
    y = super().linear(name, x, kernel, bias, adapters)
    return y, {"sumsq": jnp.sum(x.astype(jnp.float32) ** 2)}

  def act(self, name, x, adapters):
    return x, {"mean": jnp.mean(x)} if name == "mlp/hidden" else {}


@pytest.mark.parametrize("scan", [True, False])
def test_seam_side_outputs_stack_over_layers(nets, scan):
  cfg, params = nets["llama"]
  cfg = cfg.replace(scan_layers=scan)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 8)))
  h, aux = models.hidden(cfg, params, tokens, seam=_TapSeam(),
                         return_aux=True)
  np.testing.assert_array_equal(h, models.hidden(cfg, params, tokens))
  assert set(aux) == {f"{m}/sumsq" for m in
                      ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate",
                       "mlp/up", "mlp/down")} | {"mlp/hidden/mean"}
  assert all(v.shape == (cfg.n_layers,) for v in aux.values())
  # Reference: q's input in layer 0 is the normed embedding.
  x = models.layers.rms_norm(
      params["embed"]["embedding"][tokens],
      params["layers"]["attn_norm"]["scale"][0], cfg.norm_eps,
      cfg.norm_offset)
  np.testing.assert_allclose(aux["attn/q/sumsq"][0], jnp.sum(x ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(aux["attn/q/sumsq"], aux["attn/k/sumsq"])


def test_bf16_params_and_compute(nets):
  cfg, params = nets["llama"]
  cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
  p16 = models.init(cfg16, jax.random.key(1))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 16)))
  h = jax.eval_shape(lambda p, t: models.hidden(cfg16, p, t), p16, tokens)
  assert h.dtype == jnp.bfloat16
  lo = _fwd(cfg16, p16, tokens)
  hi = _fwd(cfg, params, tokens)
  assert lo.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(lo - hi))) < 0.02 * float(jnp.max(jnp.abs(hi)))


def test_hidden_unembedding_forward_consistent(nets):
  for cfg, params in nets.values():
    tokens = jnp.arange(10)[None] % cfg.vocab_size
    h = jax.jit(models.hidden, static_argnums=0)(cfg, params, tokens)
    w = models.unembedding(cfg, params)
    assert w.shape == (cfg.d_model, cfg.vocab_size)
    np.testing.assert_allclose(_fwd(cfg, params, tokens), h @ w, atol=1e-6)


def test_param_axes_cover_params_with_matching_rank():
  for name in ("tiny", "tiny-gemma3", "qwen2.5-0.5b", "gemma2-2b"):
    cfg = models.preset(name)
    shapes = jax.eval_shape(lambda c=cfg: models.init(c, jax.random.key(0)))
    axes = models.param_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)
    assert (jax.tree.structure(axes, is_leaf=is_axes)
            == jax.tree.structure(shapes))
    for a, s in zip(jax.tree.leaves(axes, is_leaf=is_axes),
                    jax.tree.leaves(shapes)):
      assert len(a) == len(s.shape)
    assert cfg.n_params() == sum(
        int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_sharded_forward_equals_single_device(nets):
  cfg, params = nets["gemma3"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.resolve_rules()
  shard = sharding.tree_shardings(models.param_axes(cfg), params, mesh, rules)
  placed = jax.device_put(params, shard)
  assert placed["layers"]["mlp"]["up"]["kernel"].sharding.spec == (
      jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 256, (4, 16)))
  with sharding.use_rules(mesh):
    got = jax.jit(models.forward, static_argnums=0)(cfg, placed, tokens)
  np.testing.assert_allclose(got, models.forward(cfg, params, tokens),
                             atol=1e-5)


def test_flops_per_token_formula():
  cfg = models.preset("tiny-gemma3")  # One local (window 8), one global.
  d, k, h, g, f, v = 64, 16, 4, 2, 128, 256
  dense = 2 * (d * h * k * 2 + d * g * k * 2 + 3 * d * f) + d * v
  t = 32
  assert cfg.flops_per_token(t) == 6 * dense + 12 * h * k * (8 + t)
  # Frozen base (adapters): no weight gradients, attention unchanged.
  assert cfg.flops_per_token(t, weight_grads=False) == (
      4 * dense + 12 * h * k * (8 + t))


def test_presets_and_errors():
  assert models.preset("gemma3-270m").n_params() == 268_098_176
  assert models.preset("llama3-8b").n_params() == 8_030_261_248
  assert models.preset("tiny", n_layers=3).layer_types == ("global",) * 3
  with pytest.raises(errors.ModelError, match="tiny-gemma3"):
    models.preset("nope")
  with pytest.raises(errors.ConfigError, match="n_kv_heads"):
    models.ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(errors.ConfigError, match="sliding_window"):
    models.ModelConfig(family="gemma2", n_layers=2)
  hash(models.preset("llama3.2-1b"))  # dict rope_scaling stays hashable.


def test_causal_block_sizes():
  from tunejax.models import attend  # pylint: disable=g-import-not-at-top
  assert attend.causal_block(128, 64) is None  # short: one block
  # About 8 blocks of >= 128 rows while the scores are small...
  assert attend.causal_block(512) == 128
  assert attend.causal_block(4096) == 512
  if jax.default_backend() != "cpu":  # accelerators ignore `rows`
    assert attend.causal_block(512, 64) == 128
    return
  # ...on a CPU, a block's float32 scores fit 8 MiB: batch 8 x 8 heads at
  # L=512 -> 64 rows; at most 16 blocks, at least 32 rows.
  assert attend.causal_block(512, 64) == 64
  assert attend.causal_block(8192, 64) == 512
  assert attend.causal_block(256, 4096) == 32
  assert attend.causal_block(256, 16) == 128  # the Gemma 3 bench's shapes


@pytest.mark.parametrize("softcap,block", [(None, None), (5.0, None),
                                           (None, 3), (5.0, 2)])
def test_attention_backward_matches_autodiff_in_float64(softcap, block):
  # The single-block attention recomputes scores in its custom backward;
  # compare with plain autodiff through softmax, incl. a fully masked row
  # (uniform probabilities but no gradient) and a padded key range; with
  # causal query blocks (the upper triangle skipped) too.
  from tunejax.models import attend  # pylint: disable=g-import-not-at-top
  with jax.enable_x64():
    rs = np.random.RandomState(0)
    b, g, r, l, k = 2, 2, 3, 7, 4
    q, kk, v, ct = (jnp.asarray(rs.randn(*s)) for s in (
        (b, g, r * l, k), (b, g, l, k), (b, g, l, k), (b, g, r * l, k)))
    mask = np.tril(np.ones((l, l), bool))[None].repeat(b, 0)
    mask[1, :, 5:] = False
    mask[1, 6, :] = False
    mask = jnp.asarray(mask)

    def reference(q, kk, v):
      s = jnp.einsum("bgmk,bgsk->bgms", q, kk) * 0.5
      if softcap:
        s = jnp.tanh(s / softcap) * softcap
      s = jnp.where(mask[:, None, None], s.reshape(b, g, r, l, l), -1e30)
      p = jax.nn.softmax(s.reshape(b, g, r * l, l), axis=-1)
      return jnp.einsum("bgms,bgsk->bgmk", p, v)

    fused = lambda q, kk, v: attend.attend(
        q, kk, v, mask, scale=0.5, softcap=softcap, causal_block=block)
    np.testing.assert_allclose(fused(q, kk, v), reference(q, kk, v),
                               atol=1e-6)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(
        q, kk, v) for f in (fused, reference)]
    for got, want in zip(*grads):
      np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("shape_w", [(6, 2), (2, 6), (4, 4)])
def test_matmul_gradients_match_float64_products(shape_w):
  # A narrow weight (out < in) takes its gradient through a custom backward
  # on a CPU; value and both gradients must equal the plain products.
  from tunejax.models import seam  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  x, w = rs.randn(2, 5, shape_w[0]), rs.randn(*shape_w)
  ct = rs.randn(2, 5, shape_w[1])
  with jax.enable_x64():
    y, vjp = jax.vjp(seam.matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(ct))
  x2, ct2 = x.reshape(10, -1), ct.reshape(10, -1)
  np.testing.assert_allclose(y, x @ w, rtol=1e-12)
  np.testing.assert_allclose(dx, (ct2 @ w.T).reshape(x.shape), rtol=1e-12)
  np.testing.assert_allclose(dw, x2.T @ ct2, rtol=1e-12)
  # Under jit and vmap too (MoE-LoRA maps its experts).
  f = jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(seam.matmul(x, w)),
                                argnums=1), in_axes=(0, None)))
  np.testing.assert_allclose(f(jnp.asarray(x, jnp.float32),
                               jnp.asarray(w, jnp.float32)),
                             np.stack([xi.T @ np.ones((5, shape_w[1]))
                                       for xi in x]), rtol=1e-5)
