"""Mask builders against numpy (float64) selections."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import errors
from tunejax.peft import hft, masks


def _np_topk(score, k):
  s = np.asarray(score, np.float64)
  flat = s.reshape(*s.shape[:-2], -1)
  return np.sort(np.argsort(-flat, axis=-1, kind="stable")[..., :k], -1)


def test_topk_and_lt_sft_selection_equal_numpy():
  rng = np.random.default_rng(0)
  theta0 = rng.normal(size=(3, 8, 12)).astype(np.float32)
  theta1 = theta0 + rng.normal(size=theta0.shape).astype(np.float32)
  got = masks.delta_indices(jnp.asarray(theta0), jnp.asarray(theta1), 17)
  want = _np_topk(np.abs(theta1.astype(np.float64) - theta0), 17)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.int32


def test_random_indices_unique_sorted_in_range():
  idx = np.asarray(masks.random_indices(jax.random.PRNGKey(0), (4, 6, 7), 20))
  assert idx.shape == (4, 20)
  for row in idx:
    assert len(set(row.tolist())) == 20 and row.min() >= 0 and row.max() < 42
    assert (np.diff(row) > 0).all()
  assert not (idx[0] == idx[1]).all()  # layers draw independently


def test_lift_mask_equals_numpy_svd_selection():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(2, 16, 12)).astype(np.float32)
  rank, k = 3, 25
  got = masks.lift_indices(jnp.asarray(w), k, rank)
  want = []
  for layer in w.astype(np.float64):
    u, s, vt = np.linalg.svd(layer, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    want.append(_np_topk(np.abs(approx), k))
  np.testing.assert_array_equal(got, np.stack(want))


def test_global_topk_equals_numpy():
  rng = np.random.default_rng(3)
  scores = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=(2, 3, 3))}
  got = masks.global_topk(scores, 9)
  allv = np.concatenate([np.abs(v).ravel() for v in scores.values()])
  thresh = np.sort(allv)[-9]
  for n, v in scores.items():
    np.testing.assert_array_equal(got[n], np.abs(v) >= thresh)
  assert sum(m.sum() for m in got.values()) == 9


def test_budget_and_dense_mask():
  assert masks.budget(64, 128, match_rank=16) == 16 * (64 + 128)
  assert masks.budget(10, 10, density=0.05) == 5
  assert masks.budget(10, 10, k=7) == 7
  assert masks.budget(4, 4, k=100) == 16
  m = masks.dense_mask(jnp.array([[0, 5], [3, 4]]), (2, 2, 3))
  want = np.zeros((2, 6), bool)
  want[0, [0, 5]] = want[1, [3, 4]] = True
  np.testing.assert_array_equal(m, want.reshape(2, 2, 3))


def test_target_modules_regex_and_typo():
  names = ["layers/attn/q/kernel", "layers/mlp/up/kernel", "embed/embedding"]
  assert masks.target_modules(names, ["layers/attn/.*"]) == ["layers/attn/q"]
  with pytest.raises(errors.ConfigError, match="matches no module"):
    masks.target_modules(names, ["layers/atn/q"])


def test_hft_round_masks_freeze_the_scheduled_half():
  members = {"attn": ("k", "o", "q", "v"), "mlp": ("down", "gate", "up"),
             "norm": ("attn_norm", "mlp_norm")}
  n_layers = 6
  rounds = []
  for rnd in range(3):
    m = jax.device_get(hft.round_masks(0, rnd, n_layers, members))
    trained = {g: np.stack([m[(g, x)] for x in ms], -1)
               for g, ms in members.items()}
    np.testing.assert_array_equal(trained["attn"].sum(-1), 2)
    np.testing.assert_array_equal(trained["norm"].sum(-1), 1)
    frozen_mlp = 3 - trained["mlp"].sum(-1)
    assert sorted(frozen_mlp.tolist()) == [1, 1, 1, 2, 2, 2]
    rounds.append(trained["attn"])
  assert not all((r == rounds[0]).all() for r in rounds[1:])  # re-drawn


def test_layerwise_lr_decay_and_freezing_through_make_tx():
  from tunejax import config as config_lib, optim
  rng = np.random.default_rng(4)
  r = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"embed": {"embedding": r(5, 3)},
            "layers": {"attn": {"q": {"kernel": r(4, 3, 2)}}},
            "lm_head": {"kernel": r(3, 5)}}
  grads = jax.tree.map(lambda x: r(*x.shape), params)
  for decay, frozen in ((0.5, 0), (0.8, 2)):
    cfg = config_lib.build(optim.OptimConfig, dict(
        name="sgd", lr=0.1, schedule="constant", clip_norm=0.0,
        layer_lr_decay=decay, freeze_layers=frozen), "optim")
    tx, _ = optim.make_tx(cfg, params, 10)
    upd, _ = tx.update(grads, tx.init(params), params)
    per_layer = decay ** (3 - np.arange(4.0))
    per_layer[:frozen] = 0
    g_q = grads["layers"]["attn"]["q"]["kernel"]
    np.testing.assert_allclose(upd["layers"]["attn"]["q"]["kernel"],
                               -0.1 * per_layer[:, None, None] * g_q,
                               rtol=1e-6)
    emb = 0.0 if frozen else decay ** 4
    np.testing.assert_allclose(upd["embed"]["embedding"],
                               -0.1 * emb * grads["embed"]["embedding"],
                               rtol=1e-6, atol=0)
    np.testing.assert_allclose(upd["lm_head"]["kernel"],
                               -0.1 * grads["lm_head"]["kernel"], rtol=1e-6)
    if frozen:
      np.testing.assert_array_equal(
          upd["layers"]["attn"]["q"]["kernel"][:frozen], 0)
