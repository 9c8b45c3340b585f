"""DFT, ASFT, FAIT and One-Token Rollout against float64 numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import kernels, losses
from tunejax.losses import sft

B, L, D, V = 2, 12, 8, 20


def _case(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, L, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) / 2).astype(np.float32)
  h_ref = (h + 0.3 * rng.normal(size=h.shape)).astype(np.float32)
  y = rng.integers(0, V, (B, L)).astype(np.int32)
  mask = (rng.random((B, L)) < 0.7).astype(np.float32)
  weights = np.where(rng.random((B, L)) < 0.3, 2.0, 1.0).astype(
      np.float32) * mask
  batch = {"tokens": rng.integers(0, V, (B, L)).astype(np.int32),
           "targets": y, "loss_mask": mask, "weights": weights}
  return h, w, h_ref, batch


def _logsoftmax(h, w, softcap=None, temperature=1.0):
  z = h.reshape(-1, D).astype(np.float64) @ w.astype(np.float64)
  if softcap:
    z = softcap * np.tanh(z / softcap)
  z = z / temperature
  m = z.max(-1, keepdims=True)
  return z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))


def _gold(logp, batch):
  return np.take_along_axis(logp, batch["targets"].reshape(-1, 1), 1)[:, 0]


def _grads_from_dz(dz, h, w):
  """Loss gradient w.r.t. (h, w) given dL/dz (no softcap): z = h @ w."""
  h2 = h.reshape(-1, D).astype(np.float64)
  return (dz @ w.astype(np.float64).T).reshape(h.shape), h2.T @ dz


def _jax_grads(name, h, w, batch, ref=None, **opts):
  fn = losses.get(name)
  def obj(h, w):
    s, d, _ = fn(losses.Head(h, w), batch, ref=ref, **opts)
    return s / d
  return jax.value_and_grad(obj, (0, 1))(jnp.asarray(h), jnp.asarray(w))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_dft_value(softcap):
  h, w, _, batch = _case()
  logp = _gold(_logsoftmax(h, w, softcap), batch)
  wt = (batch["loss_mask"] * batch["weights"]).reshape(-1)
  want = np.sum(wt * np.exp(logp) * -logp) / batch["loss_mask"].sum()
  s, d, aux = losses.get("dft")(losses.Head(h, w, softcap), batch)
  np.testing.assert_allclose(float(s / d), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["nll_sum"]), np.sum(wt * -logp),
                             rtol=1e-5)


def test_dft_gradient_matches_float64_derivation():
  h, w, _, batch = _case(1)
  logp_full = _logsoftmax(h, w)
  p_full = np.exp(logp_full)
  y = batch["targets"].reshape(-1)
  wt = (batch["loss_mask"] * batch["weights"]).reshape(-1)
  p_y = np.exp(_gold(logp_full, batch))
  # d/dz [-sg(p_y) log p_y] = p_y (softmax - onehot)
  dz = (wt * p_y)[:, None] * (p_full - np.eye(V)[y])
  dz /= batch["loss_mask"].sum()
  want_h, want_w = _grads_from_dz(dz, h, w)
  _, (gh, gw) = _jax_grads("dft", h, w, batch)
  np.testing.assert_allclose(np.asarray(gh), want_h, atol=2e-6)
  np.testing.assert_allclose(np.asarray(gw), want_w, atol=2e-6)


@pytest.mark.parametrize("direction,base", [("forward", "dft"),
                                            ("reverse", "dft"),
                                            ("forward", "sft")])
def test_asft_value_and_gradient(direction, base):
  h, w, h_ref, batch = _case(2)
  lam = 0.1
  logp_full, logq_full = _logsoftmax(h, w), _logsoftmax(h_ref, w)
  p_full, q_full = np.exp(logp_full), np.exp(logq_full)
  logp = _gold(logp_full, batch)
  if direction == "forward":
    kl = np.sum(q_full * (logq_full - logp_full), -1)
  else:
    kl = np.sum(p_full * (logp_full - logq_full), -1)
  wt = (batch["loss_mask"] * batch["weights"]).reshape(-1)
  fit = np.exp(logp) * -logp if base == "dft" else -logp
  den = batch["loss_mask"].sum()
  want = np.sum(wt * (fit + lam * kl)) / den
  ref = losses.Head(jnp.asarray(h_ref), jnp.asarray(w))
  val, (gh, gw) = _jax_grads("asft", h, w, batch, ref=ref, kl_weight=lam,
                             direction=direction, base=base)
  np.testing.assert_allclose(float(val), want, rtol=1e-5)
  if direction == "forward":
    y = batch["targets"].reshape(-1)
    fit_scale = np.exp(logp) if base == "dft" else np.ones_like(logp)
    dz = wt[:, None] * (fit_scale[:, None] * (p_full - np.eye(V)[y])
                        + lam * (p_full - q_full)) / den
    want_h, want_w = _grads_from_dz(dz, h, w)
    np.testing.assert_allclose(np.asarray(gh), want_h, atol=2e-6)
    np.testing.assert_allclose(np.asarray(gw), want_w, atol=2e-6)


def test_asft_requires_reference():
  h, w, _, batch = _case()
  with pytest.raises(Exception, match="reference"):
    losses.get("asft")(losses.Head(h, w), batch)


@pytest.mark.parametrize("schedule,step,scale", [
    ("constant", 3, 1.0), ("linear", 5, 0.5), ("inverse_linear", 2, 0.8),
    ("cosine", 5, 0.5)])
def test_fait_weights_follow_schedule(schedule, step, scale):
  h, w, _, batch = _case(3)
  batch = {**batch, "step": jnp.int32(step)}
  logp = _gold(_logsoftmax(h, w), batch)
  mask = batch["loss_mask"].reshape(-1)
  wt = mask * (1 + scale * (batch["weights"].reshape(-1) - 1))
  want = np.sum(wt * -logp) / mask.sum()
  s, d, aux = losses.get("fait")(losses.Head(h, w), batch,
                                 schedule=schedule, total_steps=10)
  np.testing.assert_allclose(float(s / d), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["fait_scale_sum"] / d), scale,
                             rtol=1e-6)


@pytest.mark.parametrize("replacement", [False, True])
def test_otr_value_and_gradient(replacement):
  h, w, _, batch = _case(4)
  k, tau, beta = 6, 1.5, -0.2
  batch = {**batch, "rng": jax.random.PRNGKey(7)}
  opts = dict(num_samples=k, temperature=tau, beta=beta,
              replacement=replacement, seed=3)
  # The candidates the loss draws, reproduced from the same key.
  key = sft.loss_rng(batch, 3)
  hn, wn = jnp.asarray(h.reshape(-1, D)), jnp.asarray(w)
  if replacement:
    from tunejax.losses import rollout  # pylint: disable=g-import-not-at-top
    ids = rollout.sample_with_replacement(hn, wn, key, k, temperature=tau,
                                          softcap=None)
  else:
    ids, _ = kernels.sample_candidates(hn, wn, key, k, temperature=tau)
  ids = np.asarray(ids)
  y = batch["targets"].reshape(-1)
  reward = np.where(ids == y[:, None], 1.0, beta)
  logp_full = _logsoftmax(h, w)
  logp_cand = np.take_along_axis(logp_full, ids, 1)
  wt = (batch["loss_mask"] * batch["weights"]).reshape(-1)
  den = batch["loss_mask"].sum()
  want = np.sum(wt * -np.mean(reward * logp_cand, 1)) / den
  # d/dz of -(1/K) Σ_k R_k log π(a_k) = -(1/K) Σ_k R_k (onehot(a_k) - softmax)
  onehot = np.zeros((ids.shape[0], V))
  np.add.at(onehot, (np.arange(ids.shape[0])[:, None], ids), reward)
  dz = -(wt[:, None] / k) * (onehot - reward.sum(1, keepdims=True) *
                             np.exp(logp_full)) / den
  want_h, want_w = _grads_from_dz(dz, h, w)
  val, (gh, gw) = _jax_grads("otr", h, w, batch, **opts)
  np.testing.assert_allclose(float(val), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gh), want_h, atol=2e-6)
  np.testing.assert_allclose(np.asarray(gw), want_w, atol=2e-6)


def test_otr_candidate_logits_blocks_and_softcap():
  h, w, _, _ = _case(5)
  hn = h.reshape(-1, D)
  ids = np.random.default_rng(0).integers(0, V, (hn.shape[0], 5))
  from tunejax.losses import rollout  # pylint: disable=g-import-not-at-top
  got = rollout.candidate_logits(jnp.asarray(hn), jnp.asarray(w),
                                 jnp.asarray(ids), softcap=4.0, block_n=5)
  z = hn.astype(np.float64) @ w.astype(np.float64)
  want = np.take_along_axis(4.0 * np.tanh(z / 4.0), ids, 1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
