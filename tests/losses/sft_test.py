"""SFT cross-entropy against a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import losses


def _case(seed=0, b=2, l=24, d=16, v=50):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, l, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / 4).astype(np.float32)
  y = rng.integers(0, v, (b, l)).astype(np.int32)
  mask = (rng.random((b, l)) < 0.3).astype(np.float32)
  weights = rng.uniform(0.5, 2.0, (b, l)).astype(np.float32)
  return h, w, y, mask, weights


def _numpy_xent(h, w, y, mask, weights, eps, z, softcap=None):
  logits = h.astype(np.float64) @ w.astype(np.float64)
  if softcap:
    logits = softcap * np.tanh(logits / softcap)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + \
      logits.max(-1)
  logp = logits - lse[..., None]
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  loss = (1 - eps) * nll - eps * logp.mean(-1) + z * lse**2
  return (weights * mask * loss).sum(), mask.sum()


@pytest.mark.parametrize("eps,z,cap,softcap,fused", [
    (0.0, 0.0, 1.0, None, False), (0.1, 1e-3, 1.0, 30.0, False),
    (0.0, 0.0, 0.5, None, False),
    (0.1, 1e-2, 0.1, None, False),  # 0.1 < trained fraction: exact fallback
    (0.1, 1e-3, 1.0, 30.0, True), (0.1, 1e-2, 0.5, None, True)])
def test_xent_matches_numpy(eps, z, cap, softcap, fused):
  h, w, y, mask, weights = _case()
  batch = {"targets": jnp.asarray(y), "loss_mask": jnp.asarray(mask),
           "weights": jnp.asarray(weights)}
  fn = losses.get("xent")

  def loss(h, w):
    s, d, _ = fn(losses.Head(h, w, softcap), batch, label_smoothing=eps,
                 z_loss=z, target_capacity=cap, grad_in_forward=fused)
    return s / d

  want_sum, want_den = _numpy_xent(h, w, y, mask, weights, eps, z, softcap)
  got = loss(jnp.asarray(h), jnp.asarray(w))
  np.testing.assert_allclose(float(got), want_sum / want_den, rtol=2e-6)
  # Gradients equal the full-logits float32 computation (capacity-free).
  def ref(h, w):
    logits = h @ w
    if softcap:
      logits = softcap * jnp.tanh(logits / softcap)
    logp = jax.nn.log_softmax(logits, -1)
    lse = jax.nn.logsumexp(logits, -1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(y)[..., None], -1)[..., 0]
    l_ = (1 - eps) * nll - eps * logp.mean(-1) + z * lse**2
    return jnp.sum(weights * mask * l_) / mask.sum()
  g = jax.grad(loss, (0, 1))(jnp.asarray(h), jnp.asarray(w))
  gr = jax.grad(ref, (0, 1))(jnp.asarray(h), jnp.asarray(w))
  for a, b in zip(g, gr):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_registry_rejects_duplicates_and_unknown():
  with pytest.raises(ValueError):
    losses.register("xent")(lambda *a, **k: None)
  with pytest.raises(Exception, match="unknown loss"):
    losses.get("nope")


def test_grad_in_forward_gives_the_same_metrics_and_rejects_other_impls():
  h, w, y, mask, weights = _case(1)
  batch = {"targets": jnp.asarray(y), "loss_mask": jnp.asarray(mask),
           "weights": jnp.asarray(weights)}
  head = losses.Head(jnp.asarray(h), jnp.asarray(w), None)
  fn = losses.get("xent")
  got = fn(head, batch, z_loss=1e-3, grad_in_forward=True)
  want = fn(head, batch, z_loss=1e-3)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[2]["nll_sum"], want[2]["nll_sum"],
                             rtol=1e-6)
  with pytest.raises(Exception, match="grad_in_forward"):
    fn(head, batch, grad_in_forward=True, impl="naive")
