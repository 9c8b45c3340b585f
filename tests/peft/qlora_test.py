"""QLoRA: NF4 / int8 block quantisation bounds, storage, training, merge."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import data, models, tree
from tunejax.peft import qlora
from tunejax.train import setup
from tests.peft.common import CFG, make_method
from tests.train.helpers import random_batch, tiny_config


def _weights(seed=0, shape=(2, 64, 100)):
  # Student-t: heavy tails make block absmax vary, as in real weights.
  rng = np.random.default_rng(seed)
  return (0.02 * rng.standard_t(4, size=shape)).astype(np.float32)


def _np_blocks(w, block):
  flat = w.reshape(*w.shape[:-2], -1).astype(np.float64)
  pad = (-flat.shape[-1]) % block
  flat = np.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
  return flat.reshape(*flat.shape[:-1], -1, block)


def test_nf4_table_matches_the_paper_construction():
  np.testing.assert_allclose(qlora.nf4_code(), qlora.NF4_CODE, atol=1e-6)


@pytest.mark.parametrize("fmt", qlora.FORMATS)
def test_dequantisation_error_within_format_bound(fmt):
  w = _weights()
  spec = qlora.QuantSpec(fmt, 64, 100, 64, False)
  deq = np.asarray(qlora.dequantize(qlora.quantize(jnp.asarray(w), spec),
                                    spec), np.float64)
  assert deq.shape == w.shape
  err = _np_blocks(np.abs(deq - w), 64)
  c = np.abs(_np_blocks(w, 64)).max(-1, keepdims=True)
  bound = qlora.half_gap(fmt) * c
  # int8: absmax/127/2; NF4: half the largest code gap (0.1386) x absmax.
  assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
  assert err.max() > 0.3 * bound.max()  # the bound is not vacuous


def test_double_quantisation_bound_and_bytes():
  w = _weights(1, (3, 128, 256))  # 512 blocks: no padding
  spec = qlora.QuantSpec("nf4", 128, 256, 64, True)
  qw = qlora.quantize(jnp.asarray(w), spec)
  c = np.abs(_np_blocks(w, 64)).max(-1)          # [3, n_blocks] float64
  c_hat = np.asarray(qlora.absmax(qw, spec), np.float64)
  # Constants: centred on their mean, int8 with one scale per 256.
  scale = np.repeat(np.asarray(qw["absmax_scale"], np.float64), 256,
                    axis=-1)[..., :c.shape[-1]]
  assert np.all(np.abs(c_hat - c) <= scale / 254 * (1 + 1e-5) + 1e-9)
  deq = np.asarray(qlora.dequantize(qw, spec), np.float64)
  err = _np_blocks(np.abs(deq - w), 64)
  bound = qlora.half_gap("nf4") * c + np.abs(c_hat - c)
  assert np.all(err <= bound[..., None] * (1 + 1e-5) + 1e-9)
  # Storage: 4-bit codes + int8 constants + fp32 per 256 constants.
  nbytes = sum(x.nbytes for x in jax.tree.leaves(qw))
  per_param = nbytes / w.size
  assert per_param == pytest.approx(qlora.bytes_per_param(spec), rel=0.01)
  assert 0.5 < per_param < 0.52


_fwd = jax.jit(models.forward, static_argnames=("cfg", "seam"))


def _forward(params, tokens, cfg=CFG, **kw):
  return np.asarray(_fwd(cfg=cfg, params=params, tokens_BxL=tokens, **kw))


@pytest.fixture(scope="module")
def qlora_state(base):
  params, tokens = base
  m = make_method(method="qlora", rank=4, alpha=8.0, quant="nf4")
  ad, frozen = jax.jit(m.init)(jax.random.PRNGKey(2), params)
  return m, params, tokens, ad, frozen


def test_frozen_base_is_half_a_byte_per_param(qlora_state):
  m, params, _, _, frozen = qlora_state
  layer_kernels = {n: v for n, v in tree.flatten(params).items()
                   if n.startswith("layers/") and n.endswith("/kernel")}
  n_params = sum(v.size for v in layer_kernels.values())
  q_bytes = sum(v.nbytes for n, v in tree.flatten(frozen).items()
                if n.startswith("layers/") and "/kernel/" in n)
  assert q_bytes / n_params == pytest.approx(
      0.5 + 1 / 64 + 4 / (64 * 256), rel=0.01)
  # Everything else (embedding, norms) is stored as before.
  rest = {n for n in tree.flatten(frozen) if "/kernel/" not in n}
  assert rest == set(tree.flatten(params)) - set(layer_kernels)


def test_init_forward_is_dequantised_base_and_merge_matches(qlora_state):
  m, params, tokens, ad, frozen = qlora_state
  merged0 = m.merged(ad, frozen)  # B = 0: the dequantised base
  out = _forward(frozen, tokens, adapters=ad, seam=m.seam)
  np.testing.assert_allclose(out, _forward(merged0, tokens), atol=1e-5)
  full = _forward(params, tokens)
  rel = np.linalg.norm(out - full) / np.linalg.norm(full)
  assert rel < 0.2  # 4-bit codes: near (measured 0.11), not equal to, fp32
  ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
      jax.random.PRNGKey(3), x.shape), ad)
  out = _forward(frozen, tokens, adapters=ad, seam=m.seam)
  merged = m.merged(ad, frozen)
  q = merged["layers"]["attn"]["q"]
  a, b = ad["layers"]["attn"]["q"]["lora_a"], ad["layers"]["attn"]["q"][
      "lora_b"]
  np.testing.assert_allclose(
      np.asarray(q["kernel"]),
      np.asarray(merged0["layers"]["attn"]["q"]["kernel"] + 2.0 * a @ b),
      atol=1e-6)
  np.testing.assert_allclose(_forward(merged, tokens), out, atol=1e-5)


def test_int8_layer_loop_equals_scan(base):
  """Quantised dict leaves slice per layer in the Python loop too."""
  params, tokens = base
  m = make_method(method="qlora", rank=4, alpha=8.0, quant="int8",
                  quant_double=False)
  ad, frozen = jax.jit(m.init)(jax.random.PRNGKey(2), params)
  ad = jax.tree.map(lambda x: x + 0.05, ad)
  loop = dataclasses.replace(CFG, scan_layers=False)
  np.testing.assert_allclose(
      _forward(frozen, tokens, cfg=loop, adapters=ad, seam=m.seam),
      _forward(frozen, tokens, adapters=ad, seam=m.seam), atol=1e-5)


def test_lora_over_quantised_base_trains():
  """On the 8 fake devices, as the LoRA training test."""
  cfg = tiny_config(peft={"method": "qlora", "rank": 4, "alpha": 8.0},
                    optim={"lr": 1e-2})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  frozen0 = jax.device_get(state.frozen)
  step = setup.jit_train_step(run, 1)
  losses = []
  for i in range(4):
    b = data.to_global(random_batch(i % 2), run.mesh, run.batch_sharding)
    state, met = step(state, b, jax.random.PRNGKey(0))
    losses.append(float(met["loss"]))
  assert losses[-1] < losses[0]
  assert all(n.endswith(("lora_a", "lora_b"))
             for n in tree.flatten(state.params))
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
