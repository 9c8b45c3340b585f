"""LoRA / rsLoRA: identity at init, merge equivalence, trainable-only state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import config as config_lib, models, peft, tree
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config

from tests.peft.common import CFG, make_method as _method


@pytest.mark.parametrize("name", ["lora", "rslora"])
def test_init_is_identity_and_merge_matches(base, name):
  params, tokens = base
  m = _method(method=name, rank=4, alpha=8.0)
  ad, frozen = m.init(jax.random.PRNGKey(2), params)
  ref = models.forward(CFG, params, tokens)
  out = models.forward(CFG, frozen, tokens, adapters=ad, seam=m.seam)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # Non-zero B: merged weights give the adapted forward.
  ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
      jax.random.PRNGKey(3), x.shape), ad)
  out = models.forward(CFG, frozen, tokens, adapters=ad, seam=m.seam)
  merged = models.forward(CFG, m.merged(ad, frozen), tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(merged), atol=1e-5)
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-3


def test_scaling_and_manual_delta(base):
  params, _ = base
  for name, s in (("lora", 8.0 / 4), ("rslora", 8.0 / 2)):
    m = _method(method=name, rank=4, alpha=8.0,
                targets=(r"layers/attn/q",))
    ad, frozen = m.init(jax.random.PRNGKey(2), params)
    ad = jax.tree.map(lambda x: x + 0.1, ad)
    a = np.asarray(ad["layers"]["attn"]["q"]["lora_a"], np.float64)
    b = np.asarray(ad["layers"]["attn"]["q"]["lora_b"], np.float64)
    w = np.asarray(params["layers"]["attn"]["q"]["kernel"], np.float64)
    got = np.asarray(m.merged(ad, frozen)["layers"]["attn"]["q"]["kernel"])
    np.testing.assert_allclose(got, w + s * a @ b, atol=1e-6)
    # Kaiming-uniform bound 1/sqrt(in), B zero at init.
    a0, _ = m.init(jax.random.PRNGKey(2), params)
    d_in = w.shape[-2]
    assert np.abs(np.asarray(a0["layers"]["attn"]["q"]["lora_a"])).max() <= (
        1 / np.sqrt(d_in))


def test_unknown_target_is_config_error(base):
  params, _ = base
  m = _method(method="lora", targets=(r"layers/attn/qq",))
  with pytest.raises(Exception, match="matches no module"):
    m.init(jax.random.PRNGKey(0), params)


_LEAVES = {"lora": ("lora_a", "lora_b"),
           "dora": ("lora_a", "lora_b", "magnitude"),
           }


# PiSSA/OLoRA are left out: their jitted, sharded init (SVD/QR on the
# 8-device fake mesh) hung when run after other runs in one process.
@pytest.mark.parametrize("name,dropout", [("lora", 0.0), ("dora", 0.1)])
def test_lora_training_touches_only_adapters(name, dropout):
  """Sharded over the 8 fake devices; dropout draws from the step rng."""
  cfg = tiny_config(peft={"method": name, "rank": 4, "alpha": 8.0,
                          "dropout": dropout},
                    optim={"lr": 1e-2})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  frozen0 = jax.device_get(state.frozen)
  step = setup.jit_train_step(run, 1)
  from tunejax import data
  losses = []
  for i in range(4):
    b = data.to_global(random_batch(i % 2), run.mesh, run.batch_sharding)
    state, m = step(state, b, jax.random.PRNGKey(0))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  names = set(tree.flatten(state.params))
  assert names and all(n.endswith(_LEAVES[name]) for n in names)
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  adam_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state)
                   if x.ndim > 0)
  assert adam_bytes == 2 * tree.nbytes(state.params)


def test_merged_forward_matches_rank_r_path():
  # `merged_linear` (x (W + s A B), LoRA's own backward) against autodiff
  # through the rank-r form x W + s (x A) B: float64, all four gradients.
  from tunejax.peft import lora, lowrank  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  x, w, a, b, ct = (rs.randn(*s) for s in ((2, 6, 5), (5, 3), (5, 2),
                                           (2, 3), (2, 6, 3)))
  rank_r = lambda x, w, a, b: x @ w + 1.5 * ((x @ a) @ b)
  with jax.enable_x64():
    args = [jnp.asarray(v) for v in (x, w, a, b)]
    merged = lambda x, w, a, b: lowrank.merged_linear(x, w, a, b,
                                                      jnp.float64(1.5))
    outs = [jax.vjp(f, *args) for f in (merged, rank_r)]
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-12)
    for got, want in zip(outs[0][1](jnp.asarray(ct)),
                         outs[1][1](jnp.asarray(ct))):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  # The seam takes it for float32 training shapes on a CPU; same values
  # and adapter gradients as the rank-r form to float32 rounding.
  x32, w32, a32, b32 = (jnp.asarray(v, jnp.float32) for v in (x, w, a, b))
  seam = lora.LoraSeam(scales=(("m", 1.5),))
  assert lowrank.merges_forward(x32, w32) == (jax.default_backend() == "cpu")
  assert not lowrank.merges_forward(x32[:1, :2], w32)  # decode-sized
  f = lambda x, a, b: seam.linear("m", x, w32, None,
                                  {"lora_a": a, "lora_b": b})
  g = lambda x, a, b: rank_r(x, w32, a, b)
  got = jax.grad(lambda *v: jnp.sum(f(*v) * ct), argnums=(0, 1, 2))(
      x32, a32, b32)
  want = jax.grad(lambda *v: jnp.sum(g(*v) * ct), argnums=(0, 1, 2))(
      x32, a32, b32)
  np.testing.assert_allclose(f(x32, a32, b32), g(x32, a32, b32), atol=1e-5)
  for gv, wv in zip(got, want):
    np.testing.assert_allclose(gv, wv, atol=1e-5)
  # A bf16 frozen kernel under float32 compute (cast before the merge).
  wb = w32.astype(jnp.bfloat16)
  got = jax.grad(lambda a: jnp.sum(seam.linear(
      "m", x32, wb, None, {"lora_a": a, "lora_b": b32})))(a32)
  want = jax.grad(lambda a: jnp.sum(rank_r(x32, wb.astype(jnp.float32), a,
                                           b32)))(a32)
  np.testing.assert_allclose(got, want, atol=1e-5)
