"""Delta files, composition and merging formulas against numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from tests.peft.common import CFG
from tunejax import models, tree
from tunejax.peft import merging, sparse


def _delta(seed, lead=2, size=64 * 64, k=30):
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.permutation(size)[:k] for _ in range(lead)])
  return {"layers/attn/q": {"indices": idx.astype(np.int32),
                            "values": rng.normal(size=(lead, k)).astype(
                                np.float32)},
          "layers/mlp/up": {"indices": np.stack(
              [rng.permutation(64 * 128)[:k] for _ in range(lead)]
          ).astype(np.int32), "values": rng.normal(size=(lead, k)).astype(
              np.float32)}}


def _np_dense(delta, shape_of):
  out = {}
  for m, e in delta.items():
    shape = shape_of[m + "/kernel"]
    d = np.zeros((shape[0], shape[1] * shape[2]))
    for layer in range(shape[0]):
      for i, v in zip(e["indices"][layer], e["values"][layer]):
        d[layer, i] += v
    out[m + "/kernel"] = d.reshape(shape)
  return out


def test_save_load_roundtrip(tmp_path):
  d = _delta(0)
  merging.save_delta(d, str(tmp_path))
  got = merging.load_delta(str(tmp_path))
  assert set(got) == set(d)
  for m in d:
    np.testing.assert_array_equal(got[m]["indices"], d[m]["indices"])
    np.testing.assert_array_equal(got[m]["values"], d[m]["values"])


def test_compose_equals_dense_sum(base):
  params, _ = base
  shapes = {n: x.shape for n, x in tree.flatten(params).items()}
  d1, d2 = _delta(1), _delta(2)
  d2["layers/attn/q"]["indices"][:, :5] = d1["layers/attn/q"]["indices"][:, :5]
  both = merging.compose(d1, d2, weights=(1.0, 0.5))
  want = {n: a + 0.5 * b for (n, a), b in zip(
      _np_dense(d1, shapes).items(), _np_dense(d2, shapes).values())}
  got = merging.densify(both, params)
  for n in want:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-6)
    # The seam's scatter-add applies the composed delta the same way.
    m = n[: -len("/kernel")]
    w = tree.flatten(params)[n]
    applied = sparse.add_delta(w, jnp.asarray(both[m]["indices"]),
                               jnp.asarray(both[m]["values"]))
    np.testing.assert_allclose(applied, np.asarray(w, np.float64) + want[n],
                               rtol=1e-5, atol=1e-6)


def _taus(params, seeds=(5, 6)):
  out = []
  for s in seeds:
    rng = np.random.default_rng(s)
    out.append({n: rng.normal(size=x.shape).astype(np.float32) * 0.01
                for n, x in tree.flatten(params).items()})
  return out


def test_task_arithmetic_equals_numpy(base):
  params, _ = base
  taus = _taus(params)
  got = tree.flatten(merging.merge(params, taus, lam=0.3))
  for n, w in tree.flatten(params).items():
    want = np.asarray(w, np.float64) + 0.3 * (taus[0][n] + taus[1][n])
    np.testing.assert_allclose(got[n], want, rtol=1e-6, atol=1e-7)
  ft = jax.tree.map(lambda x, t: x + t, params, tree.unflatten(taus[0]))
  tv = merging.task_vector(ft, params)
  np.testing.assert_allclose(tv["embed/embedding"], taus[0]["embed/embedding"],
                             atol=1e-8)


def test_breadcrumbs_equals_numpy_percentiles(base):
  params, _ = base
  taus = _taus(params)
  top, bottom, lam = 0.05, 0.6, 0.7
  got = tree.flatten(merging.merge(params, taus, method="breadcrumbs",
                                   lam=lam, top=top, bottom=bottom))
  for n, w in tree.flatten(params).items():
    total = np.zeros(w.shape)
    for tau in taus:
      t = tau[n].astype(np.float64)
      slices = t if n.startswith("layers/") else t[None]  # per layer
      keep = []
      for s in slices:
        a = np.sort(np.abs(s).ravel())
        lo = a[int(np.floor(bottom * a.size))]  # smallest kept
        hi = a[a.size - int(np.floor(top * a.size)) - 1]  # largest kept
        keep.append((np.abs(s) >= lo) & (np.abs(s) <= hi))
      t = t * np.stack(keep).reshape(t.shape)
      total += t
    np.testing.assert_allclose(got[n], np.asarray(w, np.float64) + lam * total,
                               rtol=1e-6, atol=1e-7)


def test_lines_scales_increase_with_depth(base):
  params, _ = base
  taus = _taus(params, seeds=(7,))
  alpha, beta = 0.2, 0.6
  got = tree.flatten(merging.merge(params, taus, lines=(alpha, beta)))
  n_layers = CFG.n_layers
  for n, w in tree.flatten(params).items():
    w64, t = np.asarray(w, np.float64), taus[0][n]
    if n.startswith("layers/"):
      for layer in range(n_layers):
        lam = alpha + beta * layer / (n_layers - 1)  # ℓ = layer + 1
        np.testing.assert_allclose(got[n][layer], w64[layer] + lam * t[layer],
                                   rtol=1e-6, atol=1e-7)
    else:
      lam = alpha if n.startswith("embed/") else alpha + beta
      np.testing.assert_allclose(got[n], w64 + lam * t, rtol=1e-6, atol=1e-7)


def test_cli_writes_merged_hf_checkpoint(base, tmp_path):
  params, _ = base
  models.save_hf(CFG, jax.device_get(params), str(tmp_path / "base"))
  d1, d2 = _delta(8), _delta(9)
  merging.save_delta(d1, str(tmp_path / "d1"))
  merging.save_delta(d2, str(tmp_path / "d2"))
  merging.main([f"--base={tmp_path / 'base'}", f"--out={tmp_path / 'out'}",
                f"--inputs={tmp_path / 'd1'},{tmp_path / 'd2'}",
                "--lam=0.5"])
  _, base_p = models.load(str(tmp_path / "base"))
  _, out = models.load(str(tmp_path / "out"))
  shapes = {n: x.shape for n, x in tree.flatten(base_p).items()}
  dense = [_np_dense(d, shapes) for d in (d1, d2)]
  fo = tree.flatten(out)
  for n, w in tree.flatten(base_p).items():
    want = np.asarray(w, np.float64) + 0.5 * sum(d.get(n, 0) for d in dense)
    np.testing.assert_allclose(fo[n], want, rtol=1e-6, atol=1e-6)
