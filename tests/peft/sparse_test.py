"""Sparse deltas: scatter, seam, merge, SpIEL drop/grow, state bytes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.peft.common import CFG, make_method
from tunejax import models, tree
from tunejax.peft import sparse, spiel


def _np_add_delta(w, idx, vals):
  """float64 numpy reference of W + scatter-add(idx, vals), layer-wise."""
  w = np.asarray(w, np.float64)
  flat = w.reshape(-1, w.shape[-2] * w.shape[-1]).copy()
  for row, i, v in zip(flat, np.asarray(idx).reshape(flat.shape[0], -1),
                       np.asarray(vals, np.float64).reshape(flat.shape[0], -1)):
    np.add.at(row, i, v)
  return flat.reshape(w.shape)


def test_add_delta_matches_numpy_with_duplicates():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 5, 7)).astype(np.float32)
  idx = rng.integers(0, 35, (3, 9)).astype(np.int32)
  idx[:, 1] = idx[:, 0]  # duplicates add up
  vals = rng.normal(size=(3, 9)).astype(np.float32)
  got = sparse.add_delta(jnp.asarray(w), jnp.asarray(idx), jnp.asarray(vals))
  np.testing.assert_allclose(got, _np_add_delta(w, idx, vals), rtol=1e-6,
                             atol=1e-6)


@pytest.fixture(scope="module")
def trained(base):
  """A sparse method's (trainable, frozen) with random nonzero deltas."""
  params, tokens = base
  method = make_method(method="sparse", sparse_k=40)
  t, f = method.init(jax.random.PRNGKey(3), params)
  t = jax.tree.map(lambda v: 0.05 * jax.random.normal(
      jax.random.PRNGKey(v.size), v.shape), t)
  return method, t, f, params, tokens


def test_init_is_base_and_masks_are_valid(base):
  params, tokens = base
  method = make_method(method="sparse", sparse_k=40)
  t, f = method.init(jax.random.PRNGKey(0), params)
  b, a = method.assemble(t, f)
  got = models.forward(CFG, b, tokens, adapters=a, seam=method.seam)
  np.testing.assert_array_equal(got, models.forward(CFG, params, tokens))
  for n, idx in tree.flatten(f["peft"]).items():
    w = tree.flatten(params)[n.replace("/indices", "/kernel")]
    assert idx.shape == (*w.shape[:-2], 40) and idx.dtype == jnp.int32
    for row in np.asarray(idx).reshape(-1, 40):
      assert len(set(row.tolist())) == 40
      assert row.min() >= 0 and row.max() < w.shape[-2] * w.shape[-1]


def test_forward_equals_merged_and_numpy(trained):
  method, t, f, params, tokens = trained
  b, a = method.assemble(t, f)
  merged = method.merged(t, f)
  got = models.forward(CFG, b, tokens, adapters=a, seam=method.seam)
  want = models.forward(CFG, merged, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  fi, ft, fm = (tree.flatten(f["peft"]), tree.flatten(t),
                tree.flatten(merged))
  for m in ("layers/attn/q", "layers/mlp/down"):
    ref = _np_add_delta(tree.flatten(params)[m + "/kernel"],
                        fi[m + "/indices"], ft[m + "/values"])
    np.testing.assert_allclose(fm[m + "/kernel"], ref, rtol=1e-6, atol=1e-7)
    # Entries outside the mask are the base weights, bit for bit.
    mask = np.zeros(ref.shape, bool).reshape(ref.shape[0], -1)
    for row, i in zip(mask, np.asarray(fi[m + "/indices"])):
      row[i] = True
    mask = mask.reshape(ref.shape)
    base_w = np.asarray(tree.flatten(params)[m + "/kernel"])
    np.testing.assert_array_equal(np.asarray(fm[m + "/kernel"])[~mask],
                                  base_w[~mask])


def test_value_grads_gather_the_dense_weight_grad(trained):
  """d loss / d values = (d loss / d W_eff)[indices]: the delta trains
  exactly the selected entries of the dense gradient."""
  method, t, f, _, tokens = trained

  def loss_sparse(t):
    b, a = method.assemble(t, f)
    return jnp.sum(models.forward(CFG, b, tokens, adapters=a,
                                  seam=method.seam)[..., :7] ** 2)

  def loss_dense(merged):
    return jnp.sum(models.forward(CFG, merged, tokens)[..., :7] ** 2)

  g_vals = tree.flatten(jax.grad(loss_sparse)(t))
  g_dense = tree.flatten(jax.grad(loss_dense)(method.merged(t, f)))
  for n, gv in g_vals.items():
    m = n[: -len("/values")]
    gd = np.asarray(g_dense[m + "/kernel"]).reshape(gv.shape[0], -1)
    idx = np.asarray(tree.flatten(f["peft"])[m + "/indices"])
    want = np.take_along_axis(gd, idx, axis=-1)
    np.testing.assert_allclose(gv, want, rtol=2e-4, atol=1e-6)


def test_magnitude_init_is_numpy_topk(base):
  params, _ = base
  method = make_method(method="sparse", sparse_mask="magnitude",
                       sparse_k=30, targets=("layers/attn/o",))
  _, f = method.init(jax.random.PRNGKey(0), params)
  w = np.abs(np.asarray(params["layers"]["attn"]["o"]["kernel"]))
  want = np.sort(np.argsort(-w.reshape(w.shape[0], -1), axis=-1)[:, :30], -1)
  np.testing.assert_array_equal(f["peft"]["layers"]["attn"]["o"]["indices"],
                                want)


def test_budget_matches_lora_rank(base):
  params, _ = base
  method = make_method(method="spiel", sparse_match_rank=2)
  t, _ = method.init(jax.random.PRNGKey(0), params)
  lora = make_method(method="lora", rank=2)
  lt, _ = lora.init(jax.random.PRNGKey(0), params)
  count = lambda x: sum(v.size for v in jax.tree.leaves(x))
  assert count(t) == count(lt)


def _np_spiel(idx, vals, score, n):
  """Independent numpy drop/grow for one matrix, on sets: (new active set,
  fresh entries). Growth ranks everything outside the kept set."""
  idx, vals = np.asarray(idx), np.asarray(vals)
  dropped = set(idx[np.argsort(np.abs(vals), kind="stable")[:n]].tolist())
  kept = set(idx.tolist()) - dropped
  s = np.asarray(score, np.float64).ravel().copy()
  s[list(kept)] = -np.inf
  grown = set(np.argsort(-s, kind="stable")[:n].tolist())
  return kept | grown, grown - dropped


def test_spiel_update_drops_smallest_and_grows_top_scores():
  rng = np.random.default_rng(1)
  lead, d_in, d_out, k, n = 3, 6, 10, 12, 5
  idx = np.stack([np.sort(rng.permutation(d_in * d_out)[:k])
                  for _ in range(lead)]).astype(np.int32)
  vals = rng.normal(size=(lead, k)).astype(np.float32)
  score = np.abs(rng.normal(size=(lead, d_in * d_out))).astype(np.float32)
  for layer in range(lead):  # two dropped entries are grown back
    smallest = idx[layer][np.argsort(np.abs(vals[layer]))[:2]]
    score[layer, smallest] = 10.0 + layer
  score = score.reshape(lead, d_in, d_out)
  new_idx, new_vals, rep = jax.device_get(spiel.spiel_update(
      jnp.asarray(idx), jnp.asarray(vals), jnp.asarray(score), jnp.int32(n)))
  for layer in range(lead):
    row = new_idx[layer]
    assert len(set(row.tolist())) == k
    assert row.min() >= 0 and row.max() < d_in * d_out
    want, fresh = _np_spiel(idx[layer], vals[layer], score[layer], n)
    assert set(row.tolist()) == want and len(fresh) == n - 2
    assert set(row[rep[layer]].tolist()) == fresh
    np.testing.assert_array_equal(new_vals[layer][rep[layer]], 0)
    np.testing.assert_array_equal(new_vals[layer][~rep[layer]],
                                  vals[layer][~rep[layer]])
    np.testing.assert_array_equal(row[~rep[layer]], idx[layer][~rep[layer]])


def test_spiel_update_n_zero_is_identity():
  idx = jnp.arange(8, dtype=jnp.int32)[None]
  vals = jnp.linspace(-1, 1, 8)[None]
  out = spiel.spiel_update(idx, vals, jnp.ones((1, 4, 5)), jnp.int32(0))
  np.testing.assert_array_equal(out[0], idx)
  np.testing.assert_array_equal(out[1], vals)


def test_drop_fraction_schedules():
  kw = dict(rate=0.2, first=False)
  assert spiel.drop_fraction(20, 100, schedule="linear", first=True,
                              rate=0.2) == 1.0
  np.testing.assert_allclose(
      spiel.drop_fraction(25, 100, schedule="linear", **kw), 0.2 * 0.75)
  np.testing.assert_allclose(
      spiel.drop_fraction(25, 100, schedule="cosine", **kw),
      0.2 * (1 + np.cos(np.pi * 0.25)) / 2)


def test_lift_reselect_folds_and_carries_moments():
  import optax
  from tunejax.state import TrainState
  rng = np.random.default_rng(5)
  lead, d_in, d_out, k, rank = 2, 16, 12, 20, 3
  w = rng.normal(size=(lead, d_in, d_out)).astype(np.float32)
  idx = np.stack([np.sort(rng.permutation(d_in * d_out)[:k])
                  for _ in range(lead)]).astype(np.int32)
  vals = rng.normal(size=(lead, k)).astype(np.float32)
  folded, new, src = jax.device_get(sparse.lift_reselect(
      jnp.asarray(w), jnp.asarray(idx), jnp.asarray(vals), rank))
  w_eff = _np_add_delta(w, idx, vals)
  np.testing.assert_allclose(folded, w_eff, rtol=1e-6, atol=1e-6)
  for layer in range(lead):
    u, s, vt = np.linalg.svd(w_eff[layer], full_matrices=False)
    approx = np.abs((u[:, :rank] * s[:rank]) @ vt[:rank]).ravel()
    np.testing.assert_array_equal(
        new[layer], np.sort(np.argsort(-approx, kind="stable")[:k]))
    for j, e in enumerate(new[layer]):
      hit = np.nonzero(idx[layer] == e)[0]
      assert src[layer, j] == (hit[0] if hit.size else -1)
  assert (src >= 0).any() and (src < 0).any()
  # Moments follow their entries; new entries start at zero.
  tx = optax.adam(1e-3)
  params = {"m": {"values": jnp.asarray(vals)}}
  opt = jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype
                                              ).reshape(x.shape)
                     if x.ndim else x, tx.init(params))
  state = TrainState(step=jnp.int32(0), params=params,
                     frozen={"m": {"kernel": jnp.asarray(w)},
                             "peft": {"m": {"indices": jnp.asarray(idx)}}},
                     opt_state=opt, rng=jax.random.PRNGKey(0))
  out = sparse.replace_entries(state, tx, {"m": new},
                               {"m": jnp.zeros(new.shape)}, {"m": src},
                               {"m": folded})
  mu_old, mu_new = np.asarray(opt[0].mu["m"]["values"]), np.asarray(
      out.opt_state[0].mu["m"]["values"])
  want = np.where(src >= 0, np.take_along_axis(mu_old, np.maximum(src, 0),
                                               -1), 0)
  np.testing.assert_array_equal(mu_new, want)
  np.testing.assert_array_equal(out.frozen["m"]["kernel"], folded)
  np.testing.assert_array_equal(out.frozen["peft"]["m"]["indices"], new)
