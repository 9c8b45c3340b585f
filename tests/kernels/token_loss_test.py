"""token_loss (gradient formed in the forward pass) vs float64 torch."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tests.kernels.token_stats_test import IGNORE, N, _inputs, torch_stats
from tunejax import kernels
from tunejax.kernels.token_loss import ROW_BUDGET


def torch_loss_and_grads(h, w, y, wt, eps, z, **scaling):
  """float64 Σ wt·(-(1-ε)·logp - ε·smooth + z·lse²) and d/d(h, w, wt)."""
  th, tw, twt = (torch.tensor(np.asarray(x, np.float64), requires_grad=True)
                 for x in (h, w, wt))
  logp, lse, _, smooth = torch_stats(th, tw, torch.tensor(np.asarray(y)),
                                     **scaling)
  loss = torch.sum(twt * (-(1 - eps) * logp - eps * smooth + z * lse**2))
  loss.backward()
  return [x.detach().numpy() for x in (loss, th.grad, tw.grad, twt.grad)]


def _loss(h, w, y, wt, eps, z, vocab_axis=1, **kw):
  """The loss of `[D, V]` w, read as its `[V, D]` transpose when
  vocab_axis=0 (autodiff returns dw as `[D, V]` either way)."""
  w = w if vocab_axis == 1 else w.T
  return kernels.token_loss(h, w, y, kernels.cross_entropy_terms(eps, z), wt,
                            ignore_index=IGNORE, vocab_axis=vocab_axis,
                            **kw)[0]


# block_v 100 cannot divide V=333: the last chunk overlaps the previous one
# (masked columns); N=45 is not a multiple of block_n (padded rows).
@pytest.mark.parametrize("eps,z,scaling,block_v,vocab_axis", [
    (0.0, 0.0, {}, 128, 1),
    (0.1, 1e-2, {"softcap": 4.0}, 100, 1),
    (0.2, 1e-3, {"softcap": 2.5, "temperature": 1.3}, 100, 0),
    (0.0, 1e-2, {"temperature": 0.7}, 128, 0)])
def test_value_and_grads_match_float64_reference(eps, z, scaling, block_v,
                                                 vocab_axis):
  h, w, y, cts = _inputs(3)
  wt = jnp.abs(cts[0])
  fn = jax.jit(jax.value_and_grad(
      lambda h, w, wt: _loss(h, w, y, wt, eps, z, vocab_axis, block_n=16,
                             block_v=block_v, **scaling), argnums=(0, 1, 2)))
  loss, (dh, dw, dwt) = fn(h, w, wt)
  want = torch_loss_and_grads(h, w, y, wt, eps, z, **scaling)
  # measured <= 3e-6 relative
  for name, got, ref in zip(("loss", "dh", "dw", "dweights"),
                            (loss, dh, dw, dwt), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5,
                               atol=1e-5, err_msg=name)


def _ppo_terms(st, rows):
  """A PPO-clip token loss with an entropy bonus (RL shape of per_token)."""
  ratio = jnp.exp(st.logp - rows["old_logp"])
  adv = rows["adv"]
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
  return rows["mask"] * (-surrogate - 0.01 * st.entropy)


def test_any_per_token_loss_matches_autodiff_through_token_stats():
  h, w, y, cts = _inputs(7)
  valid = (y != IGNORE).astype(jnp.float32)
  naive = kernels.token_stats(h, w, y, ignore_index=IGNORE, impl="naive")
  rows = {"adv": cts[0], "mask": valid,
          "old_logp": naive.logp + 0.3 * cts[1]}  # some ratios clip

  def fused(h, w, rows):
    return kernels.token_loss(h, w, y, _ppo_terms, rows, softcap=3.0,
                              ignore_index=IGNORE, block_n=16,
                              block_v=100)[0]

  def ref(h, w, rows):
    st = kernels.token_stats(h, w, y, softcap=3.0, want_entropy=True,
                             ignore_index=IGNORE, impl="naive")
    return jnp.sum(_ppo_terms(st, rows))

  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, rows)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2))(h, w, rows)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # float32 both


def test_statistics_and_forward_only_value():
  h, w, y, cts = _inputs(4)
  wt = jnp.abs(cts[1])
  terms = kernels.cross_entropy_terms(0.1)
  run = lambda h: kernels.token_loss(h, w, y, terms, wt, ignore_index=IGNORE,
                                     block_n=16, block_v=128)
  loss, st = run(h)
  ref = kernels.token_stats(h, w, y, label_smoothing=0.1, want_entropy=True,
                            ignore_index=IGNORE, impl="naive")
  for got, want in zip(st, ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert st.logp.shape == (N,)
  # Not differentiated: token_stats' forward; differentiated: the fused
  # pass. Both give the same value and statistics.
  (grad_loss, grad_st), _ = jax.value_and_grad(run, has_aux=True)(h)
  np.testing.assert_allclose(grad_loss, loss, rtol=1e-6)
  for got, want in zip(grad_st, st):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_match_float64_within_bf16_rounding():
  h, w, y, cts = _inputs(5)
  wt = jnp.abs(cts[2])
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  loss, (dh, dw) = jax.value_and_grad(
      lambda h, w: _loss(h, w, y, wt, 0.0, 1e-3, block_n=16, block_v=128),
      argnums=(0, 1))(hb, wb)
  assert dh.dtype == dw.dtype == jnp.bfloat16
  want = torch_loss_and_grads(hb.astype(jnp.float32), wb.astype(jnp.float32),
                              y, wt, 0.0, 1e-3)
  # float32 accumulation: only the final bf16 rounding of dh and dw.
  np.testing.assert_allclose(float(loss), want[0], rtol=1e-5)
  for got, ref in zip((dh, dw), want[1:3]):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-2,
                               atol=1e-2 * np.abs(ref).max())


def test_three_matmul_passes_and_two_when_w_is_frozen():
  # logits, dh = g w^T, dw = h^T g; a frozen unembedding drops the dw sums.
  h, w = jnp.ones((64, 16)), jnp.ones((16, 300))
  y, wt = jnp.zeros((64,), jnp.int32), jnp.ones((64,))
  loss = lambda h, w: kernels.token_loss(
      h, w, y, kernels.cross_entropy_terms(), wt, block_n=32,
      block_v=128)[0]
  for argnums, dots in (((0,), 2), ((0, 1), 3)):
    hlo = jax.jit(jax.grad(loss, argnums)).lower(h, w).compile().as_text()
    assert len(re.findall(r" dot\(", hlo)) == dots, argnums


@pytest.mark.parametrize("dtype,extra", [(jnp.float32, 0), (jnp.bfloat16, 4)])
def test_temp_memory_is_one_logit_row_block_plus_float32_dw(dtype, extra):
  # Gemma 3 shape: a block's [block_n, V] float32 logits (ROW_BUDGET) and,
  # for bf16 w only, the float32 dw sums (4 bytes per entry); no [N, V].
  n, d, v = 4096, 640, 262144
  args = (jax.ShapeDtypeStruct((n, d), dtype),
          jax.ShapeDtypeStruct((d, v), dtype))
  loss = lambda h, w: kernels.token_loss(
      h, w, jnp.zeros((n,), jnp.int32), kernels.cross_entropy_terms(),
      jnp.ones((n,)))[0]
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
  # Measured: f32 173 MiB, bf16 701 MiB.
  assert temp <= ROW_BUDGET + extra * d * v + (64 << 20), (
      temp / 2**20)


def test_sharded_inputs_on_fake_mesh_match_unsharded():
  """Trainer layout: tokens over (data, fsdp), w over (fsdp, tensor)."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Auto,) * 3)
  h, w, y, cts = _inputs(6)
  h, y, wt = h[:40], y[:40], jnp.abs(cts[0][:40])  # 40 tokens: 8 shards
  w = w[:, :320]

  def grads(h, w, y, wt):
    return jax.value_and_grad(
        lambda h, w: _loss(h, w, y, wt, 0.1, 1e-3, block_n=8, block_v=64),
        argnums=(0, 1))(h, w)

  want = jax.jit(grads)(h, w, y, wt)
  tokens = NamedSharding(mesh, P(("data", "fsdp")))
  w_sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  got = jax.jit(grads)(*(jax.device_put(x, s) for x, s in (
      (h, tokens), (w, w_sharding), (y, tokens), (wt, tokens))))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
