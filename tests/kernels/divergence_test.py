"""token_kl vs a float64 torch full-vocabulary KL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tunejax import kernels

N, D, V = 45, 24, 333  # ragged w.r.t. the blocks below
BLOCKS = dict(block_n=16, block_v=128)


def _inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(N, D))
  w = rng.normal(size=(D, V)) * 0.5
  h_ref = h + 0.4 * rng.normal(size=(N, D))
  w_ref = w + 0.2 * rng.normal(size=(D, V))
  g = rng.normal(size=N)
  return [jnp.asarray(x, dtype) for x in (h, w, h_ref, w_ref)] + [
      jnp.asarray(g, jnp.float32)]


def _torch_kl(h, w, h_ref, w_ref, g, direction, softcap, temperature):
  """float64 KL and d(g . KL)/d(h, w) with the reference detached."""
  t = lambda x: torch.tensor(np.asarray(x, np.float64))
  th, tw = t(h).requires_grad_(), t(w).requires_grad_()

  def log_probs(h, w):
    s = h @ w
    if softcap is not None:
      s = softcap * torch.tanh(s / softcap)
    return torch.log_softmax(s / temperature, -1)

  logp, logq = log_probs(th, tw), log_probs(t(h_ref), t(w_ref))
  if direction == "forward":
    kl = (logq.exp() * (logq - logp)).sum(-1)
  else:
    kl = (logp.exp() * (logp - logq)).sum(-1)
  (t(g) * kl).sum().backward()
  return kl.detach().numpy(), th.grad.numpy(), tw.grad.numpy()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (2.5, 0.8)])
def test_kl_and_policy_grads_match_float64(direction, softcap, temperature):
  h, w, h_ref, w_ref, g = _inputs()
  kw = dict(direction=direction, softcap=softcap, temperature=temperature,
            **BLOCKS)

  def objective(h, w, h_ref, w_ref):
    kl = kernels.token_kl(h, w, h_ref, w_ref, **kw)
    return jnp.sum(g * kl), kl

  grads, kl = jax.grad(objective, argnums=(0, 1, 2, 3), has_aux=True)(
      h, w, h_ref, w_ref)
  ref_kl, ref_dh, ref_dw = _torch_kl(h, w, h_ref, w_ref, g, direction,
                                     softcap, temperature)
  np.testing.assert_allclose(kl, ref_kl, rtol=1e-5, atol=3e-6)  # ~1e-6
  np.testing.assert_allclose(grads[0], ref_dh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[1], ref_dw, rtol=1e-5, atol=1e-6)
  # The reference is a constant.
  assert not np.any(grads[2]) and not np.any(grads[3])


def test_kl_of_identical_pairs_is_zero_and_naive_agrees():
  h, w, h_ref, w_ref, _ = _inputs()
  same = kernels.token_kl(h, w, h, w, **BLOCKS)
  np.testing.assert_allclose(same, 0.0, atol=2e-6)
  np.testing.assert_allclose(
      kernels.token_kl(h, w, h_ref, w_ref, impl="naive"),
      kernels.token_kl(h, w, h_ref, w_ref, **BLOCKS), rtol=1e-5, atol=3e-6)


def test_bf16_inputs():
  h, w, h_ref, w_ref, g = _inputs(jnp.bfloat16)
  kl, (dh, dw) = jax.value_and_grad(
      lambda h, w: jnp.sum(g * kernels.token_kl(h, w, h_ref, w_ref, **BLOCKS)),
      argnums=(0, 1))(h, w)
  ref_kl, ref_dh, ref_dw = _torch_kl(h, w, h_ref, w_ref, g, "forward", None,
                                     1.0)
  np.testing.assert_allclose(kl, np.sum(np.asarray(g) * ref_kl), rtol=1e-5)
  # bf16 gradients: one rounding of the tile and of the result.
  np.testing.assert_allclose(np.asarray(dh, np.float64), ref_dh, rtol=0,
                             atol=1e-2 * np.abs(ref_dh).max())
  np.testing.assert_allclose(np.asarray(dw, np.float64), ref_dw, rtol=0,
                             atol=1e-2 * np.abs(ref_dw).max())
