"""The batch iterator: coverage, determinism, resume, sharding, bad rows."""
import collections
import dataclasses
import json

import jax
import numpy as np
import pytest

from tunejax import config as config_lib
from tunejax import errors
from tunejax.data import DataConfig
from tunejax.data import make_iterator
from tunejax.data import to_global

N_ROWS = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Unique texts of varied length (3..40 bytes) as JSONL."""
  rng = np.random.default_rng(0)
  texts = [f"{i}:" + "x" * int(rng.integers(1, 38)) for i in range(N_ROWS)]
  path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return str(path), texts


def _cfg(path, **kw):
  base = DataConfig(source="jsonl", path=path, format="text", seq_len=48,
                    batch_size=4, pack_window=16)
  return dataclasses.replace(base, **kw)


def _documents(batch, prefix=""):
  """Every (tokens, targets, loss_mask) document of every row, in order."""
  docs = []
  seg_all = batch[prefix + "segment_ids"]
  for r in range(seg_all.shape[0]):
    seg = seg_all[r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(batch[prefix + "positions"][r, idx],
                                    np.arange(len(idx)))
      docs.append(tuple(tuple(batch[prefix + k][r, idx].tolist())
                        for k in ("tokens", "targets", "loss_mask")))
    pad = seg == 0
    assert not batch[prefix + "loss_mask"][r, pad].any()
  return docs


def _reference_doc(tok, text):
  ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
  return (tuple(ids[:-1]), tuple(ids[1:]), (1.0,) * (len(ids) - 1))


def _epoch_docs(it):
  return [d for batch in it for d in _documents(batch)]


def test_one_epoch_serves_every_document_once(corpus, byte_tok):
  path, texts = corpus
  it = make_iterator(_cfg(path, num_epochs=1), byte_tok, seed=3)
  docs = _epoch_docs(it)
  want = [_reference_doc(byte_tok, t) for t in texts]
  assert collections.Counter(docs) == collections.Counter(want)
  stats = it.stats()
  assert stats["examples"] == N_ROWS and stats["bad_rows"] == 0
  total = sum(len(d[0]) for d in want)
  assert stats["tokens"] == total
  assert stats["packing_efficiency"] == pytest.approx(
      total / (stats["rows"] * 48))
  assert stats["packing_efficiency"] > 0.85


def test_deterministic_for_a_seed(corpus, byte_tok):
  path, _ = corpus
  cfg = _cfg(path, num_epochs=1)
  a = list(make_iterator(cfg, byte_tok, seed=1))
  b = list(make_iterator(cfg, byte_tok, seed=1))
  c = list(make_iterator(cfg, byte_tok, seed=2))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["tokens"], y["tokens"])
             for x, y in zip(a, c))


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_at_the_next_batch(corpus, byte_tok, packing):
  path, _ = corpus
  cfg = _cfg(path, packing=packing)  # repeats forever: crosses epochs
  ref = make_iterator(cfg, byte_tok, seed=5)
  reference = [next(ref) for _ in range(40)]
  for k in (0, 1, 6, 17, 33):
    it = make_iterator(cfg, byte_tok, seed=5)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    stats = it.stats()
    restored = make_iterator(cfg, byte_tok, seed=5)
    restored.set_state(state)
    assert restored.stats() == stats
    for want in reference[k:k + 5]:
      got = next(restored)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_state_from_another_pipeline_is_rejected(corpus, byte_tok):
  path, _ = corpus
  state = make_iterator(_cfg(path), byte_tok, seed=5).get_state()
  other = make_iterator(_cfg(path), byte_tok, seed=6)
  with pytest.raises(errors.DataError, match="shuffle_seed"):
    other.set_state(state)


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_processes_read_disjoint_covering_shards(corpus, byte_tok, processes):
  path, texts = corpus
  cfg = _cfg(path, num_epochs=1, batch_size=12)
  shards = []
  for p in range(processes):
    it = make_iterator(cfg, byte_tok, seed=0, process_index=p,
                       process_count=processes)
    batches = list(it)
    assert all(b["tokens"].shape == (12 // processes, 48) for b in batches)
    shards.append(collections.Counter(d for b in batches
                                      for d in _documents(b)))
  for i in range(processes):
    for j in range(i + 1, processes):
      assert not set(shards[i]) & set(shards[j])
  union = sum(shards, collections.Counter())
  assert union == collections.Counter(_reference_doc(byte_tok, t)
                                      for t in texts)


def test_epochs_are_reshuffled(corpus, byte_tok):
  path, texts = corpus
  cfg = _cfg(path, num_epochs=2, packing=False, batch_size=N_ROWS)
  first, second = list(make_iterator(cfg, byte_tok, seed=0))
  order = [[d[0] for d in _documents(b)] for b in (first, second)]
  assert sorted(order[0]) == sorted(order[1])
  assert order[0] != order[1]
  unshuffled = dataclasses.replace(cfg, shuffle=False)
  (batch, _) = list(make_iterator(unshuffled, byte_tok, seed=0))
  want = [_reference_doc(byte_tok, t)[0] for t in texts]
  assert [d[0] for d in _documents(batch)] == want  # file order


def test_last_batch_is_padded_with_empty_rows(corpus, byte_tok):
  path, _ = corpus
  cfg = _cfg(path, num_epochs=1, packing=False, batch_size=8)
  batches = list(make_iterator(cfg, byte_tok, seed=0))
  assert len(batches) == 8  # 60 rows -> 7 full batches + 4 rows
  last = batches[-1]
  assert (last["segment_ids"][4:] == 0).all()
  assert (last["loss_mask"][:4].sum(1) > 0).all()


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
  lines = [
      json.dumps({"prompt": "a", "completion": "b"}),
      "{not json",                                        # line 2
      json.dumps({"prompt": "a"}),                        # 3 missing field
      json.dumps({"prompt": "a", "completion": 7}),       # 4 wrong type
      json.dumps({"prompt": "a", "completion": ""}),      # 5 empty
      json.dumps({"prompt": "a", "completion": "z" * 99}),  # 6 too long
      json.dumps({"prompt": "c", "completion": "d"}),
  ]
  path = tmp_path_factory.mktemp("bad") / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_bad_rows_are_skipped_and_counted(bad_file, byte_tok):
  cfg = _cfg(bad_file, format="prompt_completion", seq_len=16, num_epochs=1,
             shuffle=False)
  it = make_iterator(cfg, byte_tok, seed=0)
  docs = _epoch_docs(it)
  assert len(docs) == 2
  stats = it.stats()
  assert stats["bad_rows"] == 5 and stats["examples"] == 2
  reasons = ["invalid JSON", "missing field 'completion'",
             "expected a string, got int", "empty completion", "too long"]
  for line, (msg, reason) in enumerate(zip(stats["first_bad"], reasons), 2):
    assert msg.startswith(f"{bad_file}:{line}: ") and reason in msg


def test_bad_rows_error_names_file_and_line(bad_file, byte_tok):
  cfg = _cfg(bad_file, format="prompt_completion", seq_len=16, shuffle=False,
             bad_rows="error")
  with pytest.raises(errors.DataError, match=rf"^{bad_file}:2: invalid JSON"):
    next(make_iterator(cfg, byte_tok, seed=0))


def test_all_rows_bad_is_an_error(tmp_path, byte_tok):
  path = tmp_path / "all_bad.jsonl"
  path.write_text("{\n[]\n" * 3)
  with pytest.raises(errors.DataError, match="every row .* is bad"):
    next(make_iterator(_cfg(str(path)), byte_tok, seed=0))  # repeats forever


def test_one_good_row_in_many_bad_is_not_an_error(tmp_path, byte_tok):
  path = tmp_path / "mostly_bad.jsonl"
  path.write_text("{\n" * 9 + json.dumps({"text": "ok"}) + "\n")
  it = make_iterator(_cfg(str(path), batch_size=1, pack_window=3), byte_tok,
                     seed=0)
  batches = [next(it) for _ in range(6)]  # six reshuffled epochs
  assert all(b["loss_mask"].sum() == 3 for b in batches)  # o, k, eos
  assert it.stats()["bad_rows"] >= 45


def test_preference_batches_pair_rows(tmp_path, byte_tok):
  rows = [{"prompt": f"q{i}?", "chosen": " y" * (i % 5 + 1),
           "rejected": " n" * (i % 3 + 1)} for i in range(20)]
  path = tmp_path / "pref.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _cfg(str(path), format="preference", seq_len=24, num_epochs=1)
  pairs = []
  for batch in make_iterator(cfg, byte_tok, seed=0):
    assert "weights" not in batch and "chosen_weights" not in batch
    chosen, rejected = _documents(batch, "chosen_"), _documents(batch,
                                                                "rejected_")
    assert len(chosen) == len(rejected)
    for c, r in zip(chosen, rejected):
      pairs.append((byte_tok.decode(c[0] + c[1][-1:]),
                    byte_tok.decode(r[0] + r[1][-1:])))
  want = {(r["prompt"] + r["chosen"], r["prompt"] + r["rejected"])
          for r in rows}
  assert set(pairs) == want and len(pairs) == 20


def test_to_global_shards_rows_over_the_data_axes(corpus, byte_tok):
  path, _ = corpus
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = next(make_iterator(_cfg(path, batch_size=8), byte_tok, seed=0))
  arrays = to_global(batch, mesh)
  for k, v in arrays.items():
    assert v.shape == batch[k].shape and v.dtype == batch[k].dtype
    np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert v.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert {s.data.shape for s in v.addressable_shards} == {(1, 48)}


def test_config_is_strict(corpus, byte_tok):
  path, _ = corpus
  with pytest.raises(errors.ConfigError, match="config.data.seq_len"):
    config_lib.build(DataConfig, {"path": path, "seq_len": "long"}, "data")
  with pytest.raises(errors.ConfigError, match="config.data.train_on"):
    config_lib.build(DataConfig, {"path": path, "format": "text",
                                  "train_on": "assistant"}, "data")
  with pytest.raises(errors.ConfigError, match="did you mean 'packing'"):
    config_lib.build(DataConfig, {"path": path, "packng": True}, "data")
  with pytest.raises(errors.ConfigError, match="batch_size"):
    make_iterator(_cfg(path, batch_size=6), byte_tok, seed=0,
                  process_count=4)
  with pytest.raises(errors.DataError, match="no jsonl files"):
    make_iterator(_cfg(path + ".missing"), byte_tok, seed=0)


def test_resume_with_bad_rows_pairs_and_weights(tmp_path, byte_tok):
  rows = []
  for i in range(30):
    rows.append(json.dumps({"prompt": f"q{i}", "chosen": " y" * (i % 4 + 1),
                            "rejected": " n" * (i % 3 + 1),
                            "spans": [[0, 2, 2.0]]}))
    if i % 7 == 0:
      rows.append("{broken")
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(rows) + "\n")
  cfg = _cfg(str(path), format="preference", seq_len=20, pack_window=5,
             spans_field="spans")
  ref = make_iterator(cfg, byte_tok, seed=9)
  reference = [next(ref) for _ in range(25)]
  assert {"chosen_weights", "rejected_weights"} <= set(reference[0])
  mask, weights = reference[0]["chosen_loss_mask"], reference[0][
      "chosen_weights"]
  assert set(np.unique(weights[mask > 0])) == {1.0, 2.0}
  for k in (3, 11):
    it = make_iterator(cfg, byte_tok, seed=9)
    for _ in range(k):
      next(it)
    restored = make_iterator(cfg, byte_tok, seed=9)
    restored.set_state(json.loads(json.dumps(it.get_state())))
    assert restored.stats() == it.stats()
    assert restored.stats()["bad_rows"] > 0
    for want in reference[k:k + 4]:
      got = next(restored)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
