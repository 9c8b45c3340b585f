"""Packing: best-fit decreasing bins and the packed row layout."""
import itertools

import numpy as np
import pytest

from tunejax.data import packing


def _optimal_bins(lengths, capacity):
  """Exact minimum number of bins by brute force (tiny inputs only)."""
  n = len(lengths)
  for k in range(-(-sum(lengths) // capacity), n + 1):
    for assign in itertools.product(range(k), repeat=n):
      loads = np.zeros(k, int)
      np.add.at(loads, list(assign), lengths)
      if (loads <= capacity).all():
        return k
  return n


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_decreasing_is_a_partition_within_capacity(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 11, size=6).tolist()
  bins = packing.best_fit_decreasing(lengths, 10)
  flat = sorted(i for b in bins for i in b)
  assert flat == list(range(6))  # every item exactly once
  assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
  assert all(b == sorted(b) for b in bins)  # stream order inside a bin
  # FFD/BFD guarantee: at most 11/9 OPT + 6/9 bins.
  assert len(bins) <= 11 / 9 * _optimal_bins(lengths, 10) + 6 / 9


def test_best_fit_picks_the_tightest_bin():
  # 6 opens bin0 (room 4), 5 opens bin1 (room 5); 4 must go to bin0 (tight).
  assert packing.best_fit_decreasing([6, 5, 4], 10) == [[0, 2], [1]]
  with pytest.raises(ValueError):
    packing.best_fit_decreasing([11], 10)


def _unit(ids, mask):
  ids = np.asarray(ids, np.int32)
  mask = np.asarray(mask, np.float32)
  return ((ids[:-1], ids[1:], mask, mask * 0.5),)


def test_pack_rows_reconstruct_documents():
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 50, size=n) for n in (9, 4, 7, 3, 2, 8)]
  units = [_unit(d, rng.integers(0, 2, size=len(d) - 1)) for d in docs]
  rows = packing.pack(units, seq_len=12, pad_id=0, packing=True)
  seen = []
  for (row,) in rows:
    seg = row["segment_ids"]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(row["positions"][idx],
                                    np.arange(len(idx)))
      seen.append((row["tokens"][idx].tolist(), row["targets"][idx].tolist(),
                   row["loss_mask"][idx].tolist(),
                   row["weights"][idx].tolist()))
    pad = seg == 0
    assert (row["loss_mask"][pad] == 0).all() and (row["weights"][pad] == 0
                                                   ).all()
    assert (row["tokens"][pad] == 0).all() and (row["positions"][pad] == 0
                                                ).all()
  want = sorted((u[0][0].tolist(), u[0][1].tolist(), u[0][2].tolist(),
                 u[0][3].tolist()) for u in units)
  assert sorted(seen) == want  # no token lost or duplicated
  total = sum(len(d) - 1 for d in docs)
  assert len(rows) == -(-total // 12)  # 30 tokens fit the minimum 3 rows


def test_pack_pairs_share_segments():
  a = _unit([1, 2, 3, 4, 5], [1, 1, 1, 1])[0]
  b = _unit([1, 2, 3], [1, 1])[0]
  c = _unit([7, 8, 9, 10], [0, 1, 1])[0]
  units = [(a, b), (c, a), (b, c)]
  rows = packing.pack(units, seq_len=8, pad_id=0, packing=True)
  for chosen, rejected in rows:
    for s in range(1, chosen["segment_ids"].max() + 1):
      assert (s in chosen["segment_ids"]) and (s in rejected["segment_ids"])
    assert chosen["segment_ids"].max() == rejected["segment_ids"].max()
  # Pairs stay paired: the segment holding `a` in chosen holds `b` in
  # rejected.
  found = False
  for chosen, rejected in rows:
    for s in range(1, chosen["segment_ids"].max() + 1):
      ct = chosen["tokens"][chosen["segment_ids"] == s].tolist()
      rt = rejected["tokens"][rejected["segment_ids"] == s].tolist()
      if ct == [1, 2, 3, 4]:
        assert rt == [1, 2]
        found = True
  assert found


def test_no_packing_one_document_per_row():
  units = [_unit([1, 2, 3], [1, 1]), _unit([4, 5], [1])]
  rows = packing.pack(units, seq_len=4, pad_id=9, packing=False)
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[1][0]["tokens"], [4, 9, 9, 9])
  np.testing.assert_array_equal(rows[1][0]["segment_ids"], [1, 0, 0, 0])
