"""Sources: JSONL (.gz), text, parquet, globs/dirs, TFDS without TensorFlow."""
import dataclasses
import gzip
import importlib.util
import json
import socket
import sys
import time

import numpy as np
import pytest

from tunejax import errors
from tunejax.data import DataConfig
from tunejax.data import make_iterator
from tunejax.data import sources
from tunejax.data import synthetic
from tunejax.data import tfds_build

ROWS = synthetic.make_examples("add3", 30, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("src")
  lines = [json.dumps(r) for r in ROWS]
  # Blank lines are not records; CRLF endings are tolerated.
  (d / "a.jsonl").write_text("\n".join(lines[:20]) + "\n\n")
  with gzip.open(d / "b.jsonl.gz", "wt") as f:
    f.write("\r\n".join(lines[20:]))  # no trailing newline
  (d / "docs.txt").write_text("first doc\n\nsecond doc\nthird\n")
  return d


def _records(src):
  return [src[i] for i in range(len(src))]


def test_jsonl_plain_gz_dir_and_glob(files):
  want = [json.dumps(r) for r in ROWS]
  for path in (str(files), str(files / "*.jsonl*"),
               f"{files}/a.jsonl,{files}/b.jsonl.gz"):
    recs = _records(sources.open_source(DataConfig(source="jsonl", path=path)))
    assert [json.loads(p) for _, p in recs] == [json.loads(w) for w in want]
    assert recs[0][0] == f"{files}/a.jsonl:1"
    assert recs[20][0] == f"{files}/b.jsonl.gz:1"
    assert recs[-1][0] == f"{files}/b.jsonl.gz:10"


def test_text_lines_are_documents(files):
  cfg = DataConfig(source="text", path=str(files / "docs.txt"))
  recs = _records(sources.open_source(cfg))
  assert recs == [(f"{files}/docs.txt:1", {"text": "first doc"}),
                  (f"{files}/docs.txt:3", {"text": "second doc"}),
                  (f"{files}/docs.txt:4", {"text": "third"})]


def test_parquet(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
  recs = _records(sources.open_source(
      DataConfig(source="parquet", path=str(tmp_path / "t.parquet"))))
  assert [p for _, p in recs] == ROWS
  assert recs[3][0] == f"{tmp_path}/t.parquet:row3"


@pytest.fixture
def offline_without_tf(monkeypatch):
  """No network, and no TensorFlow (the supported install has none)."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed; these tests check the TF-free path")
  def refuse(*args, **kwargs):
    raise OSError("network is disabled in this test")
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket.socket, "connect", refuse)
  yield
  assert "tensorflow" not in sys.modules


def test_tfds_build_and_read_match_jsonl(files, tmp_path, byte_tok,
                                         offline_without_tf):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  data_dir = str(tmp_path / "tfds")
  out = tfds_build({"train": str(files), "validation": str(files /
                                                          "a.jsonl")},
                   data_dir)
  jsonl = DataConfig(source="jsonl", path=str(files),
                     format="prompt_completion", seq_len=32, batch_size=4,
                     num_epochs=1)
  by_name = dataclasses.replace(jsonl, source="tfds", path="tunejax_jsonl",
                                tfds_data_dir=data_dir)
  by_dir = dataclasses.replace(by_name, path=out, tfds_data_dir=None)
  want = _records(sources.open_source(jsonl))
  assert _records(sources.open_source(by_name)) == want  # origins kept
  assert _records(sources.open_source(by_dir)) == want
  val = dataclasses.replace(by_name, split="validation")
  assert _records(sources.open_source(val)) == want[:20]
  # Same records and seed -> the same batches as reading the JSONL files.
  for a, b in zip(make_iterator(jsonl, byte_tok, seed=0),
                  make_iterator(by_name, byte_tok, seed=0), strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_tfds_text_build(files, tmp_path, offline_without_tf):
  out = tfds_build(str(files / "docs.txt"), str(tmp_path / "t"), kind="text")
  recs = _records(sources.open_source(DataConfig(source="tfds", path=out)))
  assert [json.loads(p) for _, p in recs] == [
      {"text": "first doc"}, {"text": "second doc"}, {"text": "third"}]


def test_unprepared_tfds_name_fails_fast(tmp_path, offline_without_tf):
  start = time.time()
  with pytest.raises(errors.DataError, match="'mnist': TFDS dataset is not "
                     "prepared"):
    sources.open_source(DataConfig(source="tfds", path="mnist",
                                   tfds_data_dir=str(tmp_path)))
  with pytest.raises(errors.DataError, match="unknown TFDS dataset"):
    sources.open_source(DataConfig(source="tfds", path="no_such_dataset_x",
                                   tfds_data_dir=str(tmp_path)))
  assert time.time() - start < 10  # no download retries


def test_missing_and_unreadable_paths(tmp_path):
  with pytest.raises(errors.DataError, match="no parquet files"):
    sources.open_source(DataConfig(source="parquet",
                                   path=str(tmp_path / "*.parquet")))
  (tmp_path / "broken.parquet").write_text("not parquet")
  with pytest.raises(errors.DataError, match="broken.parquet: cannot read"):
    sources.open_source(DataConfig(source="parquet",
                                   path=str(tmp_path / "broken.parquet")))


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_line_index_matches_str_splitlines(chunk):
  import io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(chunk)
  alphabet = np.frombuffer(b"ab\r\n", np.uint8)
  for _ in range(50):
    raw = rng.choice(alphabet, size=int(rng.integers(0, 30))).tobytes()
    f = io.BytesIO(raw)
    # pylint: disable-next=protected-access,cell-var-from-loop
    starts, ends = sources._line_spans(lambda: f.read(chunk))
    got = [raw[s:e] for s, e in zip(starts, ends) if e > s]
    want = [line.removesuffix(b"\r") for line in raw.split(b"\n")]
    assert got == [w for w in want if w], raw
