"""Preference losses vs TRL's formulas (float64 numpy / TRL's own functions).

Per-token log-probs are recomputed here from full float64 logits, summed per
(row, segment) pair, and fed into the formulas of
trl 1.16 `trl/trainer/dpo_trainer.py::_compute_loss` (lines 1387-1431:
sigmoid, hinge, ipo with per-token normalisation, robust; implicit rewards
β·Δ at 1581-1599), the cDPO form of its `aot` branch (1453-1455), and the
official TDPO `trainers.py::tdpo_loss`. SimPO and ORPO call TRL's own
`CPOTrainer.cpo_loss` and `ORPOTrainer.odds_ratio_loss`.
"""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import losses
from tunejax.losses import preference as pref
from tunejax.losses import token_pref

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

V, D = 23, 8
# Rows of pairs: (prompt_len, chosen_len, rejected_len) per segment; sides
# are packed independently, so their spans differ but segment ids align.
LAYOUT = [[(2, 3, 5), (1, 4, 2)], [(3, 6, 4)], [(1, 2, 2), (2, 1, 3),
                                                (1, 2, 1)]]
L = 16


def _side(rng, rows, which):
  b = len(rows)
  out = {k: np.zeros((b, L), np.int32) for k in ("tokens", "targets",
                                                 "segment_ids", "positions")}
  out["loss_mask"] = np.zeros((b, L), np.float32)
  for i, row in enumerate(rows):
    start = 0
    for seg, (p, c, r) in enumerate(row, 1):
      n = p + (c if which == "chosen" else r)
      sl = slice(start, start + n)
      out["tokens"][i, sl] = rng.integers(3, V, n)
      out["targets"][i, sl] = rng.integers(3, V, n)
      out["loss_mask"][i, start + p:start + n] = 1.0
      out["segment_ids"][i, sl] = seg
      out["positions"][i, sl] = np.arange(n)
      start += n
  return {f"{which}_{k}": v for k, v in out.items()}


def make_batch(seed=0, layout=None):
  rng = np.random.default_rng(seed)
  layout = LAYOUT if layout is None else layout
  return {**_side(rng, layout, "chosen"), **_side(rng, layout, "rejected")}


def make_head(seed, b, scale=1.0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(2 * b, L, D)).astype(np.float32)
  w = (scale * rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  return losses.Head(jnp.asarray(h), jnp.asarray(w), None)


def np_logp(head):
  """float64 log-softmax [2B, L, V] from the head (interleaved rows)."""
  z = np.asarray(head.h_BxLxD, np.float64) @ np.asarray(head.w_DxV,
                                                        np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_pairs(batch, head):
  """Per-pair (logp_w, logp_l, len_w, len_l) lists in float64, and the
  per-token log-prob arrays per side."""
  lsm = np_logp(head)
  out = {}
  tok = {}
  for j, side in enumerate(pref.SIDES):
    lp = lsm[j::2]
    t = batch[f"{side}_targets"]
    tok[side] = np.take_along_axis(lp, t[..., None], -1)[..., 0]
  for i, row in enumerate(LAYOUT):
    for seg in range(1, len(row) + 1):
      vals = []
      for side in pref.SIDES:
        m = (batch[f"{side}_segment_ids"][i] == seg) * batch[
            f"{side}_loss_mask"][i]
        vals += [np.sum(tok[side][i] * m), np.sum(m)]
      out[(i, seg)] = vals
  return out, tok


def sig_loss(z, eps=0.0):
  logsig = lambda x: -np.logaddexp(0.0, -x)
  return -(1 - eps) * logsig(z) - eps * logsig(-z)


@pytest.fixture(scope="module")
def setup():
  batch = make_batch()
  b = batch["chosen_tokens"].shape[0]
  policy, ref = make_head(1, b), make_head(2, b)
  ref = ref._replace(h_BxLxD=policy.h_BxLxD + 0.3 * ref.h_BxLxD,
                     w=policy.w)
  pol, _ = np_pairs(batch, policy)
  rf, _ = np_pairs(batch, ref)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  return jb, policy, ref, pol, rf


def trl_dpo(pol, rf, beta, loss_type, eps):
  """TRL `_compute_loss` per-sequence losses (mean over pairs)."""
  out = []
  for key in pol:
    lw, nw, ll, nl = pol[key]
    rw, _, rl, _ = rf[key]
    cw, cl = lw - rw, ll - rl
    delta = cw - cl
    if loss_type == "sigmoid":
      out.append(sig_loss(beta * delta, eps))
    elif loss_type == "hinge":
      out.append(max(0.0, 1 - beta * delta))
    elif loss_type == "ipo":
      out.append((cw / max(nw, 1) - cl / max(nl, 1) - 1 / (2 * beta)) ** 2)
    elif loss_type == "robust":
      clean = -(1 - eps) * -np.logaddexp(0, -beta * delta)
      flipped = -eps * -np.logaddexp(0, beta * delta)
      out.append((clean - flipped) / (1 - 2 * eps))
  return np.mean(out)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0),
                                           ("robust", 0.1)])
def test_dpo_matches_trl(setup, loss_type, eps):
  batch, policy, ref, pol, rf = setup
  beta = 0.7
  ls, denom, aux = pref.dpo(policy, batch, ref=ref, beta=beta,
                            loss_type=loss_type, label_smoothing=eps)
  assert float(denom) == len(pol)
  want = trl_dpo(pol, rf, beta, loss_type, eps)
  np.testing.assert_allclose(float(ls / denom), want, rtol=2e-5, atol=1e-6)
  # TRL metrics: rewards β·Δ, accuracy chosen > rejected, logps.
  r_w = np.array([beta * (pol[k][0] - rf[k][0]) for k in pol])
  r_l = np.array([beta * (pol[k][2] - rf[k][2]) for k in pol])
  n = float(denom)
  np.testing.assert_allclose(float(aux["rewards/chosen_sum"]) / n,
                             r_w.mean(), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux["rewards/margin_sum"]) / n,
                             (r_w - r_l).mean(), rtol=2e-5, atol=1e-6)
  assert float(aux["rewards/accuracy_sum"]) == np.sum(r_w > r_l)
  np.testing.assert_allclose(float(aux["logps/rejected_sum"]) / n,
                             np.mean([pol[k][2] for k in pol]), rtol=2e-5)


def test_precomputed_reference_equals_online(setup):
  """Per-token reference log-probs given in the batch == the ref Head."""
  batch, policy, ref, _, _ = setup
  ref_w, ref_l = pref.token_logps(ref, batch)
  pre = {**batch, "chosen_ref_logp": ref_w, "rejected_ref_logp": ref_l}
  for loss_type in ("sigmoid", "ipo"):
    online = pref.dpo(policy, batch, ref=ref, loss_type=loss_type)
    offline = pref.dpo(policy, pre, ref=None, loss_type=loss_type)
    np.testing.assert_array_equal(np.asarray(online[0]),
                                  np.asarray(offline[0]))
  g_on = jax.grad(lambda h: pref.dpo(policy._replace(h_BxLxD=h), batch,
                                     ref=ref)[0])(policy.h_BxLxD)
  g_off = jax.grad(lambda h: pref.dpo(policy._replace(h_BxLxD=h), pre)[0])(
      policy.h_BxLxD)
  np.testing.assert_array_equal(np.asarray(g_on), np.asarray(g_off))


def _trl_self(**kw):
  acc = types.SimpleNamespace(device="cpu")
  return types.SimpleNamespace(accelerator=acc, **kw)


def test_simpo_and_orpo_match_trl_functions(setup):
  torch = pytest.importorskip("torch")
  from trl.experimental.cpo.cpo_trainer import CPOTrainer
  from trl.experimental.orpo.orpo_trainer import ORPOTrainer
  batch, policy, _, pol, _ = setup
  # TRL averages log-probs per token for SimPO/ORPO (average_log_prob=True).
  avg_w = torch.tensor([pol[k][0] / pol[k][1] for k in pol])
  avg_l = torch.tensor([pol[k][2] / pol[k][3] for k in pol])
  beta, gamma, eps = 2.0, 0.5, 0.1
  cpo_self = _trl_self(alpha=0.0, loss_type="simpo", simpo_gamma=gamma,
                       beta=beta, label_smoothing=eps)
  want, rw, _ = CPOTrainer.cpo_loss(cpo_self, avg_w, avg_l)
  ls, denom, aux = pref.simpo(policy, batch, beta=beta, gamma=gamma,
                              label_smoothing=eps)
  np.testing.assert_allclose(float(ls / denom), want.mean().item(),
                             rtol=2e-5)
  np.testing.assert_allclose(float(aux["rewards/chosen_sum"] / denom),
                             rw.mean().item(), rtol=2e-5)
  lam = 0.25
  or_self = _trl_self(beta=lam)
  or_losses, _, _, _, log_odds = ORPOTrainer.odds_ratio_loss(or_self, avg_w,
                                                            avg_l)
  ls, denom, aux = pref.orpo(policy, batch, beta=lam)
  # ORPO total = NLL(chosen) − mean(β·log σ(log odds)); NLL per pair mean.
  nll = -avg_w.mean().item()
  np.testing.assert_allclose(float(ls / denom), nll - or_losses.mean().item(),
                             rtol=2e-5)
  np.testing.assert_allclose(float(aux["log_odds_sum"] / denom),
                             log_odds.item(), rtol=2e-5)


def test_tdpo_kl_and_loss_match_full_logits(setup):
  batch, policy, ref, pol, rf = setup
  lp, lq = np_logp(policy), np_logp(ref)
  kl_tok = np.sum(np.exp(lq) * (lq - lp), -1)  # KL(π_ref ‖ π_θ) per token
  kl_w, kl_l = pref.sequential_kl(policy, ref, batch)
  for j, (side, got) in enumerate(zip(pref.SIDES, (kl_w, kl_l))):
    want = kl_tok[j::2] * np.asarray(batch[f"{side}_loss_mask"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
  beta, alpha = 0.5, 0.5
  d = {}
  for i, row in enumerate(LAYOUT):
    for seg in range(1, len(row) + 1):
      d[(i, seg)] = [np.sum(kl_tok[j::2][i] * (np.asarray(
          batch[f"{s}_segment_ids"][i]) == seg) * np.asarray(
              batch[f"{s}_loss_mask"][i])) for j, s in enumerate(pref.SIDES)]
  for variant in (1, 2):
    want = []
    for k in pol:
      u = (pol[k][0] - rf[k][0]) - (pol[k][2] - rf[k][2])
      dw, dl = d[k]
      z = u - (dl - dw) if variant == 1 else u - alpha * (dl - dw)
      want.append(sig_loss(beta * z))
    ls, denom, aux = token_pref.tdpo(policy, batch, ref=ref, beta=beta,
                               alpha=alpha, variant=variant)
    np.testing.assert_allclose(float(ls / denom), np.mean(want), rtol=2e-5)
  np.testing.assert_allclose(float(aux["kl_sum"] / denom),
                             np.mean([sum(v) / 2 for v in d.values()]),
                             rtol=1e-4)


def test_tdpo2_stops_gradient_of_chosen_kl(setup):
  """TDPO2's chosen KL is detached: the gradient through D(y_w) vanishes."""
  batch, policy, ref, _, _ = setup
  def loss_of(kl_scale_w):
    p = pref.Pairs(*(jnp.ones(3) for _ in range(7)))
    return token_pref.tdpo_objective(p, kl_scale_w * jnp.ones(3), jnp.ones(3),
                               beta=0.1, alpha=0.5, variant=2).sum()
  assert float(jax.grad(loss_of)(1.0)) == 0.0
  del batch, policy, ref


def test_treg_matches_formula(setup):
  batch, policy, ref, pol, rf = setup
  rng = np.random.default_rng(5)
  b = batch["chosen_tokens"].shape[0]
  rewards = {s: token_pref.contrastive_token_rewards(
      jnp.asarray(rng.normal(size=(b, L)), jnp.float32),
      jnp.asarray(rng.normal(size=(b, L)), jnp.float32)) for s in pref.SIDES}
  assert float(jnp.max(jnp.abs(rewards["chosen"]))) <= 0.5
  tb = {**batch, "chosen_token_rewards": rewards["chosen"],
        "rejected_token_rewards": rewards["rejected"]}
  _, tok = np_pairs(batch, policy)
  beta, alpha = 0.3, 0.25
  want = []
  for i, row in enumerate(LAYOUT):
    for seg in range(1, len(row) + 1):
      k = (i, seg)
      reg = []
      for s in pref.SIDES:
        m = (np.asarray(batch[f"{s}_segment_ids"][i]) == seg) * np.asarray(
            batch[f"{s}_loss_mask"][i])
        reg.append(-beta * np.sum(np.asarray(rewards[s][i], np.float64)
                                  * tok[s][i] * m))
      r_w, r_l = beta * (pol[k][0] - rf[k][0]), beta * (pol[k][2] - rf[k][2])
      w = 1 / (1 + np.exp(-(r_l - r_w)))
      want.append(sig_loss(r_w - r_l) + alpha * w * sum(reg))
  ls, denom, _ = token_pref.treg(policy, tb, ref=ref, beta=beta, alpha=alpha)
  np.testing.assert_allclose(float(ls / denom), np.mean(want), rtol=2e-5)


def test_token_rewards(setup):
  batch, policy, ref, _, _ = setup
  pw, _ = pref.token_logps(policy, batch)
  rw, _ = pref.token_logps(ref, batch)
  mask = batch["chosen_loss_mask"]
  r = token_pref.token_rewards(pw, rw, mask, beta=0.1)
  np.testing.assert_allclose(np.asarray(r),
                             0.1 * np.asarray(pw - rw) * np.asarray(mask),
                             rtol=1e-6)
  # Summed over a response, the token rewards are DPO's implicit reward.
  seq = pref.pair_sums(r, batch["chosen_segment_ids"])
  p = pref.pairs(batch, pw, pw, rw, rw)
  np.testing.assert_allclose(np.asarray(seq), 0.1 * np.asarray(
      p.logp_w - p.ref_w), rtol=1e-5, atol=1e-7)
  clipped = token_pref.token_rewards(pw, rw, mask, beta=1.0, clip=0.05)
  assert float(jnp.max(jnp.abs(clipped))) <= 0.05 + 1e-7


def test_model_inputs_interleave():
  batch = make_batch()
  toks, pos, seg = pref.model_inputs(batch)
  np.testing.assert_array_equal(np.asarray(toks)[0::2],
                                batch["chosen_tokens"])
  np.testing.assert_array_equal(np.asarray(seg)[1::2],
                                batch["rejected_segment_ids"])
  assert pos.shape == (2 * len(LAYOUT), L)
