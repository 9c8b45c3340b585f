"""Pallas TPU/GPU bodies: interpret-mode numerics and accelerator lowering."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import errors
from tunejax import kernels
from tunejax.kernels import _tiles

# Tiny grids (interpret mode runs the grid in Python): 3 token blocks x 3
# vocabulary blocks, both ragged. D = 48 is split into 16-wide chunks by the
# Triton body.
N, D, V = 45, 48, 333
BLOCKS = dict(block_n=16, block_v=128)
OPTS = dict(softcap=3.0, temperature=0.8, want_entropy=True,
            label_smoothing=0.1, ignore_index=-100)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) * 0.4, jnp.float32)
  y = rng.integers(0, V, N)
  y[[0, 17]] = -100
  cts = jnp.asarray(rng.normal(size=(4, N)), jnp.float32)
  return h, w, jnp.asarray(y), cts


def _value_and_grads(impl, h, w, y, cts, vocab_axis=1):
  # Compiled on its own accelerator (when the suite runs on one), else
  # interpreted. A vocab-major w is passed as such; its dw comes back [D, V].
  native = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}.get(impl)
  interpret = None if native is None else jax.default_backend() != native
  w_in = w if vocab_axis == 1 else w.T

  def objective(h, w_in):
    out = kernels.token_stats(h, w_in, y, impl=impl, interpret=interpret,
                              vocab_axis=vocab_axis, **OPTS, **BLOCKS)
    return sum(jnp.sum(c * s) for c, s in zip(cts, out)), out

  (dh, dw), out = jax.grad(objective, argnums=(0, 1), has_aux=True)(h, w_in)
  return list(out) + [dh, dw if vocab_axis == 1 else dw.T]


@pytest.fixture(scope="module")
def xla_result(inputs):
  return _value_and_grads("xla", *inputs)


@pytest.mark.parametrize("impl,vocab_axis", [
    ("pallas_tpu", 1), ("pallas_gpu", 1), ("pallas_gpu", 0)])
def test_interpret_mode_equals_xla_path(impl, vocab_axis, inputs, xla_result):
  got = _value_and_grads(impl, *inputs, vocab_axis=vocab_axis)
  names = list(kernels.TokenStats._fields) + ["dh", "dw"]
  for name, a, b in zip(names, got, xla_result):
    # Same tile math, different summation order: measured <= 2e-6.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_merge_stats_equals_one_pass_over_all_columns():
  """The Triton forward's vocabulary splits, merged, give the statistics
  of a single pass; an empty split (init values) contributes nothing."""
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(5, 40)) * 4, jnp.float32)
  cols = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (5, 40))
  y = jnp.asarray([[3], [39], [-1], [20], [0]], jnp.int32)
  fold = lambda a, b: _tiles.update_stats(_tiles.init_stats(5), s[:, a:b],
                                          cols[:, a:b], True, y)
  parts = [fold(0, 15), fold(15, 40), _tiles.init_stats(5)]
  merged = _tiles.merge_stats(
      jax.tree.map(lambda *x: jnp.concatenate(x, axis=1), *parts))
  for name, a, b in zip(_tiles.Stats._fields, merged, fold(0, 40)):
    # float32 sums of 40 terms in another order (and the GPU's exp).
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_auto_on_gpu_takes_the_chunked_path_when_triton_cannot(monkeypatch):
  """D = 8 has no Triton D chunk: on a GPU, 'auto' runs the XLA path and an
  explicit 'pallas_gpu' is a one-line config error."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 50, 6))
  got = kernels.token_stats(h, w, y)  # would fail inside a Triton body
  want = kernels.token_stats(h, w, y, impl="naive")
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-5, atol=1e-5)
  with pytest.raises(errors.ConfigError, match="D divisible by 16, got D=8"):
    kernels.token_stats(h, w, y, impl="pallas_gpu", interpret=True)


def test_auto_on_gpu_keeps_exact_float32_products_off_triton(monkeypatch):
  """Under the "float32" default matmul precision Triton runs float32 dots
  without tensor cores (W1 on an H100: 89 ms vs a few ms in cuBLAS): 'auto'
  then takes the chunked path for float32 inputs, and still Triton for
  bf16 inputs or at the default precision."""
  ts = importlib.import_module("tunejax.kernels.token_stats")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert ts._auto_gpu_impl(64, jnp.float32) == "pallas_gpu"
  rng = np.random.default_rng(3)
  h = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 50, 6))
  for precision in ("float32", "highest"):
    with jax.default_matmul_precision(precision):
      assert ts._auto_gpu_impl(64, jnp.float32) == "xla"
      assert ts._auto_gpu_impl(64, jnp.bfloat16) == "pallas_gpu"
      got = kernels.token_stats(h, w, y)  # would fail inside a Triton body
  want = kernels.token_stats(h, w, y, impl="naive")
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-5, atol=1e-5)


def _lowered_grad(platform, shape, loss_of_stats, argnums=(0, 1), **opts):
  """StableHLO of a bf16 loss gradient through token_stats, lowered for
  `platform` (lowering only: no device here)."""
  n, d, v = shape
  w_shape = (v, d) if opts.get("vocab_axis") == 0 else (d, v)
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
          jax.ShapeDtypeStruct(w_shape, jnp.bfloat16),
          jax.ShapeDtypeStruct((n,), jnp.int32))

  def grads(h, w, y):
    def loss(h, w):
      return loss_of_stats(kernels.token_stats(h, w, y, interpret=False,
                                               **opts))
    return jax.grad(loss, argnums=argnums)(h, w)

  return jax.jit(grads).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("impl,platform,target", [
    ("pallas_tpu", "tpu", "tpu_custom_call"),
    ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton"),
])
def test_lowers_for_accelerators_at_gemma3_shape(impl, platform, target):
  """Block shapes, primitives, Mosaic/Triton IR emission for forward +
  backward with bf16 inputs and a softcap."""
  text = _lowered_grad(
      platform, (4096, 640, 262144),
      lambda st: jnp.sum(st.logp) + jnp.sum(st.entropy) + jnp.sum(st.lse**2),
      impl=impl, softcap=30.0, want_entropy=True)
  calls = re.findall(r"custom_call @([\w$.]+)", text)
  # TPU: the forward kernel plus the dw kernel; GPU: the forward kernel
  # (its backward is XLA's chunked path).
  assert calls.count(target) == (2 if platform == "tpu" else 1), calls


def test_triton_reads_a_tied_embedding_in_place():
  """A vocab-major [V, D] table reaches the Triton kernel and the chunked
  backward as it is: no whole-table transpose (335 MB for Gemma 3)."""
  text = _lowered_grad("cuda", (4096, 640, 262144),
                       lambda st: -jnp.sum(st.logp), impl="pallas_gpu",
                       vocab_axis=0)
  assert "__gpu$xla.gpu.triton" in text
  assert not re.search(r"stablehlo.transpose[^\n]*-> tensor<640x262144x", text)
  # The check can see a whole-table transpose: the TPU body makes one.
  text = _lowered_grad("tpu", (4096, 640, 262144),
                       lambda st: -jnp.sum(st.logp), impl="pallas_tpu",
                       vocab_axis=0)
  assert re.search(r"stablehlo.transpose[^\n]*-> tensor<640x262144x", text)


def _live_tpu_kernels(argnums):
  """Mosaic kernels whose results are used, in the TPU lowering of a CE
  gradient w.r.t. `argnums` (XLA deletes the unused ones: they have no side
  effects)."""
  text = _lowered_grad("tpu", (1024, 640, 32768), lambda st: -jnp.sum(st.logp),
                       argnums, impl="pallas_tpu")
  assert "has_side_effect = true" not in text
  results = re.findall(r"(%[\w]+)(?::\d+)? = stablehlo.custom_call "
                       r"@tpu_custom_call", text)
  assert results
  uses = lambda r: len(re.findall(re.escape(r) + r"(?![\w])", text)) - 1
  return [r for r in results if uses(r)]


def test_tpu_frozen_unembedding_needs_no_backward_logit_pass():
  """dh comes from the forward kernel's moments: with w frozen (LoRA) the
  op is that one kernel (two matmul passes); a trainable w adds the dw
  kernel (one more logit pass plus the dw matmul)."""
  assert len(_live_tpu_kernels(0)) == 1
  assert len(_live_tpu_kernels((0, 1))) == 2
