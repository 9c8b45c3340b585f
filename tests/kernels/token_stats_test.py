"""token_stats values and gradients vs a float64 torch full-logits reference."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tunejax import errors
from tunejax import kernels
from tunejax.kernels import _xla

# Ragged on purpose: N is not a multiple of block_n, V not of block_v, so the
# padded token block and the overlapping last vocabulary chunk are exercised.
N, D, V = 45, 24, 333
BLOCKS = dict(block_n=16, block_v=128)
IGNORE = -100


def _inputs(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(N, D))
  w = rng.normal(size=(D, V)) * 0.6
  y = rng.integers(0, V, N)
  y[[2, 7, 30]] = IGNORE
  cts = rng.normal(size=(4, N))
  return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(y),
          jnp.asarray(cts, jnp.float32))


def torch_stats(h, w, y, softcap=None, temperature=1.0):
  """float64 reference: (logp, lse, entropy, smooth) as torch tensors."""
  s = h @ w
  if softcap is not None:
    s = softcap * torch.tanh(s / softcap)
  s = s / temperature
  logp_all = torch.log_softmax(s, dim=-1)
  valid = y != IGNORE
  tgt = torch.gather(logp_all, 1, torch.where(valid, y, 0)[:, None])[:, 0]
  logp = torch.where(valid, tgt, torch.zeros_like(tgt))
  entropy = -(logp_all.exp() * logp_all).sum(-1)
  return logp, torch.logsumexp(s, -1), entropy, logp_all.mean(-1)


def torch_value_and_grads(h, w, y, cts, **kw):
  """Reference stats and d(sum_k cts[k] . stat_k)/d(h, w) in float64."""
  th = torch.tensor(np.asarray(h, np.float64), requires_grad=True)
  tw = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
  stats = torch_stats(th, tw, torch.tensor(np.asarray(y)), **kw)
  tc = torch.tensor(np.asarray(cts, np.float64))
  sum(torch.sum(c * s) for c, s in zip(tc, stats)).backward()
  return ([s.detach().numpy() for s in stats], th.grad.numpy(),
          tw.grad.numpy())


def jax_value_and_grads(h, w, y, cts, impl, **kw):
  def objective(h, w):
    out = kernels.token_stats(h, w, y, ignore_index=IGNORE, want_entropy=True,
                              label_smoothing=0.1, impl=impl, **kw)
    return sum(jnp.sum(c * s) for c, s in zip(cts, out)), out

  grads, out = jax.grad(objective, argnums=(0, 1), has_aux=True)(h, w)
  return [np.asarray(s) for s in out], np.asarray(grads[0]), np.asarray(
      grads[1])


def _assert_close(got, want, rtol, atol, what):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                             atol=atol, err_msg=what)


# block_v 128 becomes 111 (3 chunks tile V=333 exactly); 100 cannot divide
# V, so the last chunk overlaps the previous one (masked columns).
@pytest.mark.parametrize("impl,block_v", [("xla", 128), ("xla", 100),
                                          ("naive", 128)])
@pytest.mark.parametrize("scaling", [
    {}, {"softcap": 4.0}, {"temperature": 0.7},
    {"softcap": 2.5, "temperature": 1.3}])
def test_values_and_grads_match_float64_reference(impl, scaling, block_v):
  h, w, y, cts = _inputs(0)
  stats, dh, dw = jax_value_and_grads(h, w, y, cts, impl, block_n=16,
                                      block_v=block_v, **scaling)
  ref_stats, ref_dh, ref_dw = torch_value_and_grads(h, w, y, cts, **scaling)
  for name, got, want in zip(kernels.TokenStats._fields, stats, ref_stats):
    _assert_close(got, want, 1e-5, 1e-5, name)  # measured <= 2e-6
  assert np.all(stats[0][[2, 7, 30]] == 0.0)
  _assert_close(dh, ref_dh, 1e-5, 1e-5, "dh")
  _assert_close(dw, ref_dw, 1e-5, 1e-5, "dw")


@pytest.mark.parametrize("n,block_n,want", [
    (4096, 1048, (1024, 4)), (4100, 1024, (824, 5)), (5, 1024, (8, 1)),
    (4096, 1024, (1024, 4))])
def test_token_blocks_are_balanced(n, block_n, want):
  # Every padding row costs a pass over the whole vocabulary: at most 7
  # per block (rows are padded to a multiple of 8).
  bn, _, n_blocks, _ = _xla.plan(n, 32000, block_n, 2048)
  assert (bn, n_blocks) == want
  assert bn <= block_n or n < 8
  assert 0 <= bn * n_blocks - n < 8 * n_blocks


def test_optional_outputs_are_none_unless_requested():
  h, w, y, _ = _inputs(1)
  out = kernels.token_stats(h, w, y, impl="xla")
  assert out.entropy is None and out.smooth is None
  assert out.logp.shape == out.lse.shape == (N,)
  assert out.logp.dtype == out.lse.dtype == jnp.float32


def test_cross_entropy_with_label_smoothing_and_z_loss_matches_torch():
  """The trainer's SFT loss assembled from the op equals torch's CE."""
  h, w, y, _ = _inputs(2)
  eps, z_coef = 0.1, 1e-3

  def loss(h, w):
    st = kernels.token_stats(h, w, y, ignore_index=IGNORE, label_smoothing=eps,
                             impl="xla", **BLOCKS)
    valid = y != IGNORE
    per_tok = -(1 - eps) * st.logp - eps * st.smooth + z_coef * st.lse**2
    return jnp.sum(jnp.where(valid, per_tok, 0.0)) / jnp.sum(valid)

  val, (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1))(h, w)
  th = torch.tensor(np.asarray(h, np.float64), requires_grad=True)
  tw = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
  ty = torch.tensor(np.asarray(y, np.int64))
  logits = th @ tw
  ce = torch.nn.functional.cross_entropy(logits, ty, ignore_index=IGNORE,
                                         label_smoothing=eps)
  valid = ty != IGNORE
  z = (torch.logsumexp(logits, -1)[valid] ** 2).mean()
  ref = ce + z_coef * z
  ref.backward()
  _assert_close(val, ref.item(), 1e-6, 1e-6, "loss")
  _assert_close(dh, th.grad.numpy(), 1e-5, 1e-6, "dh")
  _assert_close(dw, tw.grad.numpy(), 1e-5, 1e-6, "dw")


def test_bf16_inputs_accumulate_in_float32():
  h, w, y, cts = _inputs(3, jnp.bfloat16)
  stats, dh, dw = jax_value_and_grads(h, w, y, cts, "xla", softcap=4.0,
                                      **BLOCKS)
  # The reference sees the same bf16-rounded inputs, in float64.
  ref_stats, ref_dh, ref_dw = torch_value_and_grads(h, w, y, cts, softcap=4.0)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  for name, got, want in zip(kernels.TokenStats._fields, stats, ref_stats):
    _assert_close(got, want, 1e-5, 2e-5, name)  # f32 accumulation
  # Gradients pass through one bf16 rounding (tile cast + output cast).
  scale_h, scale_w = np.abs(ref_dh).max(), np.abs(ref_dw).max()
  _assert_close(dh, ref_dh, 0, 1e-2 * scale_h, "dh")
  _assert_close(dw, ref_dw, 0, 1e-2 * scale_w, "dw")


def test_mixed_dtypes_give_cotangents_in_input_dtypes():
  h, w, y, _ = _inputs(6)
  h16 = h.astype(jnp.bfloat16)
  dh, dw = jax.grad(
      lambda h, w: jnp.sum(kernels.token_stats(h, w, y, impl="xla").logp),
      argnums=(0, 1))(h16, w)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  ref = kernels.token_stats(h16.astype(jnp.float32), w, y, impl="naive")
  np.testing.assert_allclose(
      kernels.token_stats(h16, w, y, impl="xla").logp, ref.logp, atol=1e-5)


def test_jit_and_bad_impl():
  h, w, y, _ = _inputs(4)
  f = jax.jit(lambda h, w: kernels.token_stats(h, w, y, impl="xla").logp)
  np.testing.assert_allclose(
      f(h, w), kernels.token_stats(h, w, y, impl="naive").logp, atol=1e-5)
  with pytest.raises(errors.ConfigError, match="impl='cuda'"):
    kernels.token_stats(h, w, y, impl="cuda")


def _temp_bytes(impl, n, d, v, dtype=jnp.bfloat16):
  """Compiled (not run) temp memory of a CE + z-loss value-and-grad."""
  def loss(h, w, y):
    st = kernels.token_stats(h, w, y, impl=impl)
    return -jnp.sum(st.logp) + 1e-4 * jnp.sum(st.lse**2)

  args = (jax.ShapeDtypeStruct((n, d), dtype),
          jax.ShapeDtypeStruct((d, v), dtype),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_at_gemma3_vocab_is_100x_below_naive():
  naive = _temp_bytes("naive", 4096, 640, 262144)
  fused = _temp_bytes("xla", 4096, 640, 262144)
  # Measured on XLA:CPU: naive 12.6 GiB, fused 79 MiB (~160x).
  assert naive > 8 * 2**30
  assert fused * 100 <= naive, (fused, naive)


def test_sharded_inputs_on_fake_mesh_match_unsharded():
  """Trainer layout: tokens over (data, fsdp), w over (fsdp, tensor)."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(5)
  h = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(32, 256)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, 256, 64))

  def grads(h, w, y):
    def loss(h, w):
      st = kernels.token_stats(h, w, y, impl="xla", block_n=16, block_v=64)
      return jnp.sum(st.logp) - 0.1 * jnp.sum(st.lse)
    return jax.grad(loss, argnums=(0, 1))(h, w)

  want = jax.jit(grads)(h, w, y)
  tokens = NamedSharding(mesh, P(("data", "fsdp")))
  w_sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  got = jax.jit(grads)(jax.device_put(h, tokens),
                       jax.device_put(w, w_sharding),
                       jax.device_put(y, tokens))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_w_gradient_needs_no_backward_logit_pass():
  # dh comes from moments streamed in the forward, so a frozen unembedding
  # costs two matmul passes (logits, moments) and the dw loop is dead code;
  # a trainable one adds the recompute and dw matmuls.
  h, w = jnp.ones((64, 16)), jnp.ones((16, 300))
  y = jnp.zeros((64,), jnp.int32)
  loss = lambda h, w: kernels.token_stats(
      h, w, y, impl="xla", block_n=32, block_v=128).logp.sum()
  for argnums, dots in (((0,), 2), ((0, 1), 4)):
    hlo = jax.jit(jax.grad(loss, argnums)).lower(h, w).compile().as_text()
    assert len(re.findall(r" dot\(", hlo)) == dots, argnums


@pytest.mark.parametrize("impl", ["xla", "naive"])
def test_vocab_major_w_equals_transposed(impl):
  # A tied embedding table [V, D] is read as is (vocab_axis=0): same stats
  # and gradients as its [D, V] transpose, incl. dw in the [V, D] layout.
  rs = np.random.RandomState(1)
  h = jnp.asarray(rs.randn(40, 8), jnp.float32)
  w_vd = jnp.asarray(rs.randn(300, 8) * 0.3, jnp.float32)
  y = jnp.asarray(rs.randint(-1, 300, 40), jnp.int32)

  def loss(h, w, axis):
    st = kernels.token_stats(h, w, y, impl=impl, want_entropy=True,
                             label_smoothing=0.1, softcap=3.0,
                             block_n=16, block_v=128, vocab_axis=axis)
    return jnp.sum(st.logp * 1.3 - 0.2 * st.lse + 0.1 * st.entropy
                   + 0.5 * st.smooth)

  got = jax.value_and_grad(loss, (0, 1))(h, w_vd, 0)
  want = jax.value_and_grad(loss, (0, 1))(h, w_vd.T, 1)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1][0], want[1][0], atol=1e-5)
  np.testing.assert_allclose(got[1][1], want[1][1].T, atol=1e-5)


def test_vocab_major_w_makes_no_transposed_copy():
  # 16 MiB table: the compiled gradient (frozen w) holds no copy of it.
  h = jax.ShapeDtypeStruct((512, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((65536, 64), jnp.float32)
  y = jax.ShapeDtypeStruct((512,), jnp.int32)
  loss = lambda h, w, y: kernels.token_stats(
      h, w, y, impl="xla", vocab_axis=0, block_n=128,
      block_v=2048).logp.sum()
  mem = jax.jit(jax.grad(loss)).lower(h, w, y).compile().memory_analysis()
  assert mem.temp_size_in_bytes < 65536 * 64 * 4 / 2, mem.temp_size_in_bytes
