"""Sparse methods through the trainer: SpIEL and LT-SFT events, frozen
entries, optimizer-state size, Half Fine-Tuning rounds, end-to-end runs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train.helpers import random_batch, tiny_config
from tunejax import data, train, tree
from tunejax.peft import hft, merging
from tunejax.train import loop, metrics as metrics_lib, setup

K = 64
# One config per method, shared by the event tests and the end-to-end runs
# so that their compiled steps and events are reused (setup caches runs).
SPIEL = dict(total_steps=12, optim={"lr": 3e-2}, mesh={"data": 1},
             peft={"method": "spiel", "sparse_mask": "fisher", "sparse_k": K,
                   "targets": (r"layers/attn/(q|o)", r"layers/mlp/down"),
                   "spiel_every": 4, "sparse_batches": 2,
                   "spiel_first_full": False, "spiel_rate": 0.5},
             checkpoint={"export_at_end": True, "async_save": False},
             eval={"every": -1})
LT_SFT = dict(total_steps=8, optim={"lr": 3e-2}, mesh={"data": 1},
              peft={"method": "lt_sft", "sparse_k": K, "lt_sft_steps": 3},
              checkpoint={"async_save": False}, eval={"every": -1})


def _build(sections):
  cfg = tiny_config(**sections)
  model_cfg, params = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  return cfg, state, run


@pytest.fixture(scope="module")
def spiel():
  return _build(SPIEL)


def _ctx(cfg, run, seeds):
  """An event context whose batches are `random_batch(seed)`."""
  return loop.event_context(cfg, run, iter([random_batch(s) for s in seeds]))


_GRADS = {}


def _kernel_grads(run, state, seeds):
  """[∂L_b/∂W for b in seeds] for all targeted kernels at once (independent
  of the method's one-module-at-a-time path)."""
  names = [n[: -len("/indices")] + "/kernel"
           for n in tree.flatten(state.frozen["peft"])]
  if id(run) not in _GRADS:
    def loss(kern, params, frozen, batch):
      fz = tree.unflatten(dict(tree.flatten(frozen), **kern))
      ls, dn, _ = run.loss_fn(run.apply_fn(params, fz, batch, None), batch)
      return ls / dn
    _GRADS[id(run)] = jax.jit(jax.grad(loss))
  kern = {n: tree.flatten(state.frozen)[n] for n in names}
  out = []
  for s in seeds:
    b = data.to_global(random_batch(s), run.mesh, run.batch_sharding)
    g = _GRADS[id(run)](kern, state.params, state.frozen, b)
    out.append({n[: -len("/kernel")]: np.asarray(v, np.float64)
                for n, v in g.items()})
  return out


def _np_topk(score, k):
  flat = score.reshape(score.shape[0], -1)
  return np.sort(np.argsort(-flat, axis=-1, kind="stable")[:, :k], -1)


def test_spiel_event_drops_smallest_and_grows_top_grads(spiel):
  cfg, state, run = spiel
  # Nonzero values and moments so that drop and reset are visible.
  rnd = lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape)
  sh = run.state_shardings  # same shardings: the compiled events are reused
  state = state.replace(
      params=jax.device_put(jax.tree.map(rnd, state.params), sh.params),
      opt_state=jax.device_put(jax.tree.map(
          lambda x: x + 1.0 if x.ndim else x, state.opt_state), sh.opt_state))
  new = run.method.on_step(state, 4, _ctx(cfg, run, (11, 12)))
  n = int(np.floor(K * 0.5 * (1 - 4 / 12)))
  g1, g2 = _kernel_grads(run, state, (11, 12))
  grads = {m: g1[m] + g2[m] for m in g1}
  old_i, new_i = (tree.flatten(s.frozen["peft"]) for s in (state, new))
  old_v, new_v = tree.flatten(state.params), tree.flatten(new.params)
  mu = tree.flatten(new.opt_state[1].mu)
  for m, g in grads.items():
    score = np.abs(g).reshape(g.shape[0], -1)
    for layer in range(g.shape[0]):
      oi, ni = old_i[m + "/indices"][layer], new_i[m + "/indices"][layer]
      ov, nv = old_v[m + "/values"][layer], new_v[m + "/values"][layer]
      assert len(set(ni.tolist())) == K and 0 <= ni.min() and \
          ni.max() < score.shape[1]
      dropped = set(oi[np.argsort(np.abs(ov), kind="stable")[:n]].tolist())
      kept = set(oi.tolist()) - dropped
      s = score[layer].copy()
      s[list(kept)] = -np.inf
      grown = set(np.argsort(-s, kind="stable")[:n].tolist())
      assert set(ni.tolist()) == kept | grown
      fresh = ~np.isin(ni, oi)
      np.testing.assert_array_equal(nv[fresh], 0)
      np.testing.assert_array_equal(mu[m + "/values"][layer][fresh], 0)
      kept = np.isin(ni, oi)
      np.testing.assert_array_equal(nv[kept], ov[kept])
      np.testing.assert_array_equal(mu[m + "/values"][layer][kept],
                                    np.asarray(tree.flatten(
                                        state.opt_state[1].mu)[
                                            m + "/values"])[layer][kept])


def test_fisher_mask_is_top_squared_grads(spiel):
  cfg, state, run = spiel
  new = run.method.on_start(state, _ctx(cfg, run, (3, 4)))
  idx = tree.flatten(new.frozen["peft"])
  g1, g2 = _kernel_grads(run, state, (3, 4))
  for m in g1:
    np.testing.assert_array_equal(idx[m + "/indices"],
                                  _np_topk(g1[m] ** 2 + g2[m] ** 2, K))


def test_lt_sft_selection_is_numpy_topk_of_the_phase1_change():
  cfg, state, run = _build(LT_SFT)
  theta1 = run.method.full_finetune(_ctx(cfg, run, (1, 2, 3)), state, 3)
  new = run.method.on_start(state, _ctx(cfg, run, (1, 2, 3)))
  idx, base = tree.flatten(new.frozen["peft"]), tree.flatten(state.frozen)
  for m in theta1:
    d = np.abs(np.asarray(theta1[m], np.float64) -
               np.asarray(base[m + "/kernel"], np.float64))
    assert d.max() > 0
    np.testing.assert_array_equal(idx[m + "/indices"], _np_topk(d, K))
  # Reset: the base kernels are θ0 and the deltas start at zero.
  for n, x in tree.flatten(new.frozen).items():
    if not n.startswith("peft/"):
      np.testing.assert_array_equal(x, base[n])
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(new.params))


def test_lt_sft_global_selection_is_numpy_global_topk():
  """Global LT-SFT keeps one top-K of |θ1 − θ0| over all matrices (each
  capped at its slots); inactive slots never train."""
  peft_cfg = {**LT_SFT["peft"], "lt_sft_global": True, "lt_sft_slack": 3.0}
  cfg, state, run = _build({**LT_SFT, "peft": peft_cfg})
  theta1 = run.method.full_finetune(_ctx(cfg, run, (1, 2, 3)), state, 3)
  new = run.method.on_start(state, _ctx(cfg, run, (1, 2, 3)))
  extra = tree.flatten(jax.device_get(new.frozen["peft"]))
  base = tree.flatten(jax.device_get(state.frozen))
  # numpy: per matrix the top-`slots` candidates, then one global top-K.
  cands, total = [], 0
  for m in sorted(theta1):
    d = np.abs(np.asarray(theta1[m], np.float64) -
               np.asarray(base[m + "/kernel"], np.float64))
    d = d.reshape(d.shape[0], -1)
    slots = extra[m + "/indices"].shape[-1]
    total += K * d.shape[0]
    for layer in range(d.shape[0]):
      top = np.argsort(-d[layer], kind="stable")[:slots]
      cands += [(d[layer, j], m, layer, j) for j in top]
  want = {(m, l, j) for _, m, l, j in sorted(cands, key=lambda c: -c[0])
          [:total]}
  got = {(m, l, int(j)) for m in theta1
         for l, (row, act) in enumerate(zip(extra[m + "/indices"],
                                            extra[m + "/active"]))
         for j, a in zip(row, act) if a}
  assert got == want and len(got) == total
  counts = [int(extra[m + "/active"][l].sum()) for m in theta1
            for l in range(extra[m + "/active"].shape[0])]
  assert min(counts) != max(counts)  # really global, not K per matrix
  step = setup.jit_train_step(run, 1)
  for i in range(2):
    b = data.to_global(random_batch(i), run.mesh, run.batch_sharding)
    new, _ = step(new, b, jax.random.PRNGKey(0))
  vals = tree.flatten(jax.device_get(new.params))
  for m in theta1:
    act = extra[m + "/active"] > 0
    assert np.all(vals[m + "/values"][~act] == 0)
    assert np.any(vals[m + "/values"][act] != 0)


def test_inactive_entries_never_change_and_state_scales_with_k(spiel):
  _, state, run = spiel  # no events: a static mask
  state = jax.tree.map(jnp.copy, state)  # the step donates its input
  base = tree.flatten(jax.device_get(state.frozen))
  step = setup.jit_train_step(run, 1)
  values = tree.flatten(state.params)
  k_total = sum(v.size for v in values.values())
  # Adam: mu + nu of float32 per value; counters are a few scalars.
  opt_bytes = tree.nbytes(state.opt_state)
  assert 8 * k_total <= opt_bytes <= 8 * k_total + 64
  for i in range(8):
    b = data.to_global(random_batch(i), run.mesh, run.batch_sharding)
    state, _ = step(state, b, jax.random.PRNGKey(0))
  merged = tree.flatten(jax.device_get(run.method.merged(state.params,
                                                         state.frozen)))
  for n, x in tree.flatten(jax.device_get(state.frozen)).items():
    np.testing.assert_array_equal(x, base[n])  # frozen untouched
  for n in values:
    m = n[: -len("/values")]
    w0, w = base[m + "/kernel"], merged[m + "/kernel"]
    idx = base[f"peft/{m}/indices"]
    mask = np.zeros((w.shape[0], w[0].size), bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    mask = mask.reshape(w.shape)
    np.testing.assert_array_equal(w[~mask], w0[~mask])
    assert (w[mask] != w0[mask]).mean() > 0.9  # the active ones train


def test_deltas_shard_with_their_matrix_and_events_keep_shardings():
  cfg, state, run = _build(dict(
      total_steps=8, mesh={"data": 2, "fsdp": 4},
      peft={"method": "spiel", "sparse_k": K, "spiel_every": 4,
            "sparse_batches": 1, "targets": (r"layers/attn/q",)}))
  sh = run.state_shardings
  assert sh.params["layers"]["attn"]["q"]["values"].spec == P(None, "fsdp")
  assert sh.frozen["peft"]["layers"]["attn"]["q"]["indices"].spec == \
      P(None, "fsdp")
  new = run.method.on_step(state, 4, _ctx(cfg, run, (0,)))
  same = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                      new, sh)
  assert all(jax.tree.leaves(same))
  idx = np.asarray(new.frozen["peft"]["layers"]["attn"]["q"]["indices"])
  assert (idx != np.asarray(
      state.frozen["peft"]["layers"]["attn"]["q"]["indices"])).any()


def test_hft_freezes_exactly_the_scheduled_half():
  _, state, run = _build(dict(total_steps=4, mesh={"data": 1},
                              peft={"method": "hft", "hft_every": 2,
                                    "hft_seed": 3}))
  step = setup.jit_train_step(run, 1)
  prev = jax.device_get(state.params)
  members = hft.groups(tree.flatten(prev))
  n_layers = prev["layers"]["attn"]["q"]["kernel"].shape[0]
  for i in range(4):
    b = data.to_global(random_batch(i), run.mesh, run.batch_sharding)
    state, _ = step(state, b, jax.random.PRNGKey(0))
    cur = jax.device_get(state.params)
    masks = jax.device_get(hft.round_masks(3, i // 2, n_layers, members))
    for n, x in tree.flatten(cur).items():
      x0 = tree.flatten(prev)[n]
      gm = hft.member(n)
      if gm is None:
        assert (x != x0).any(), n  # embeddings, head, final norm train
        continue
      for layer in range(n_layers):
        changed = (x[layer] != x0[layer]).any()
        assert changed == bool(masks[gm][layer]), (n, layer, i)
    prev = cur


@pytest.fixture(scope="module")
def spiel_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("spiel"))
  cfg = tiny_config(**SPIEL)
  return cfg, wd, train.run(cfg, wd)


def test_spiel_trains_end_to_end_and_exports_deltas(spiel_run):
  cfg, wd, out = spiel_run
  losses = [r["loss"] for r in metrics_lib.read(wd) if "loss" in r]
  assert len(losses) == 12 and losses[-1] < losses[0] - 0.3
  state, run = out["state"], out["run"]
  init, _ = setup.build(cfg, *setup.load_model(cfg.model))
  init_idx = tree.flatten(jax.device_get(init.frozen["peft"]))
  delta = merging.load_delta(os.path.join(wd, "export", "delta"))
  idx = tree.flatten(jax.device_get(state.frozen["peft"]))
  vals = tree.flatten(jax.device_get(state.params))
  for m, e in delta.items():
    np.testing.assert_array_equal(e["indices"], idx[m + "/indices"])
    np.testing.assert_array_equal(e["values"], vals[m + "/values"])
    for row in e["indices"]:
      assert len(set(row.tolist())) == K
    assert (e["indices"] != init_idx[m + "/indices"]).any()  # drop/grow ran
  assert os.path.exists(os.path.join(wd, "export", "hf"))


def test_lt_sft_trains_end_to_end(tmp_path):
  train.run(tiny_config(**LT_SFT), str(tmp_path))
  losses = [r["loss"] for r in metrics_lib.read(str(tmp_path)) if "loss" in r]
  assert len(losses) == 8 and losses[-1] < losses[0] - 0.3


class _Killed(Exception):
  pass


def test_spiel_resume_is_bitwise(spiel_run, tmp_path, monkeypatch):
  """Killed after step 6 (checkpoint at 4, after its drop/grow event), the
  resumed run ends bit for bit where the uninterrupted one did."""
  _, _, full = spiel_run
  cfg = tiny_config(**dict(SPIEL, checkpoint={"every": 2, "async_save": False}))
  orig = metrics_lib.MetricsWriter.write

  def write(self, step, m):
    orig(self, step, m)
    if step == 6 and "loss" in m:
      raise _Killed()
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)
  with pytest.raises(_Killed):
    train.run(cfg, str(tmp_path))
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", orig)
  out = train.run(cfg, str(tmp_path))
  for a, b in ((out["state"].params, full["state"].params),
               (out["state"].frozen["peft"], full["state"].frozen["peft"])):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                    jax.tree.leaves(jax.device_get(b))):
      np.testing.assert_array_equal(x, y)


def test_lift_reselection_through_the_loop(tmp_path):
  cfg = tiny_config(total_steps=4, optim={"lr": 3e-2}, mesh={"data": 1},
                    peft={"method": "sparse", "sparse_mask": "lift",
                          "sparse_k": K, "lift_rank": 4, "lift_every": 2,
                          "targets": (r"layers/attn/q",)},
                    checkpoint={"async_save": False}, eval={"every": -1})
  init, _ = setup.build(cfg, *setup.load_model(cfg.model))
  w0 = np.asarray(init.frozen["layers"]["attn"]["q"]["kernel"])
  i0 = np.asarray(init.frozen["peft"]["layers"]["attn"]["q"]["indices"])
  out = train.run(cfg, str(tmp_path))
  state = jax.device_get(out["state"])
  w = state.frozen["layers"]["attn"]["q"]["kernel"]
  idx = state.frozen["peft"]["layers"]["attn"]["q"]["indices"]
  # The step-2 fold moved exactly the entries trained before it.
  changed = np.nonzero((w != w0).reshape(w.shape[0], -1))
  for layer in range(w.shape[0]):
    assert set(changed[1][changed[0] == layer]) <= set(i0[layer].tolist())
    assert len(set(idx[layer].tolist())) == K
  assert (w != w0).any()
  losses = [r["loss"] for r in metrics_lib.read(str(tmp_path)) if "loss" in r]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
