"""Random-access record sources over local files (no network, no TensorFlow).

A source is a sequence whose item `i` is `(origin, payload)`: `origin` is the
'file:line' (or 'file:row') the record came from, for error messages, and
`payload` is either a JSON string (parsed later, so invalid JSON is a counted
bad row rather than a crash) or an already structured dict. Sources only
index files at construction; records are read on demand, so a large JSONL
file costs 16 bytes of index per line, not its size in memory.
"""
from __future__ import annotations

import glob
import gzip
import os
from typing import Any, Sequence

import numpy as np

from tunejax import errors
from tunejax.data.config import DataConfig

_CHUNK = 1 << 24
_SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"),
             "text": (".txt", ".txt.gz", ".text"),
             "parquet": (".parquet",)}


def expand_paths(path: str, kind: str) -> list[str]:
  """Files named by a file, a glob, a comma-separated list or a directory."""
  files = []
  for part in (p.strip() for p in path.split(",") if p.strip()):
    if os.path.isdir(part):
      found = sorted(os.path.join(part, f) for f in os.listdir(part)
                     if f.endswith(_SUFFIXES[kind]))
    elif any(c in part for c in "*?["):
      found = sorted(glob.glob(part))
    else:
      found = [part] if os.path.exists(part) else []
    if not found:
      raise errors.DataError(f"config.data.path: no {kind} files at {part!r}")
    files.extend(found)
  return files


def _line_spans(read_chunk) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) byte offsets of the lines of a stream, by chunked scan.

  `end` excludes the newline and a '\r' before it (CRLF files).
  """
  starts, ends, total, prev = [], [], 0, 0
  while True:
    buf = read_chunk()
    if not buf:
      break
    arr = np.frombuffer(buf, np.uint8)
    nl = np.flatnonzero(arr == 10)
    before = np.where(nl > 0, arr[np.maximum(nl - 1, 0)], prev)
    starts.append(nl + total + 1)
    ends.append(nl + total - (before == 13))
    total, prev = total + len(buf), arr[-1]
  starts = np.concatenate([[0]] + starts).astype(np.int64)
  ends = np.concatenate(ends + [[total - (prev == 13)]]).astype(np.int64)
  return starts, ends  # the last "line" is empty when the file ends in \n


class _LineFile:
  """Lines of one file; plain files are read with pread, .gz from memory."""

  def __init__(self, path: str):
    self.path = path
    try:
      if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
          self._data = f.read()
        self._fd = None
        view = iter([self._data, b""])
        starts, ends = _line_spans(lambda: next(view))
      else:
        self._data = None
        self._fd = os.open(path, os.O_RDONLY)
        with open(path, "rb") as f:
          starts, ends = _line_spans(lambda: f.read(_CHUNK))
    except OSError as e:
      raise errors.DataError(f"{path}: cannot read ({e})") from None
    keep = ends - starts > 0  # empty lines are not records
    self.starts, self.ends = starts[keep], ends[keep]
    self.line_numbers = np.flatnonzero(keep) + 1

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)

  def __len__(self) -> int:
    return len(self.starts)

  def line(self, i: int) -> str:
    start, end = int(self.starts[i]), int(self.ends[i])
    if self._fd is None:
      raw = self._data[start:end]
    else:
      raw = os.pread(self._fd, end - start, start)
    return raw.decode("utf-8", errors="replace")


class LineSource:
  """Records = non-empty lines of several files, in file order.

  With `text_field` set, each line is a plain-text document
  `{text_field: line}`; otherwise it is a JSON string to be parsed.
  """

  def __init__(self, files: Sequence[str], text_field: str | None = None):
    self._files = [_LineFile(f) for f in files]
    self._text_field = text_field
    sizes = [len(f) for f in self._files]
    self._offsets = np.cumsum([0] + sizes)

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, i: int) -> tuple[str, Any]:
    k = int(np.searchsorted(self._offsets, i, side="right")) - 1
    f, j = self._files[k], i - int(self._offsets[k])
    origin = f"{f.path}:{int(f.line_numbers[j])}"
    line = f.line(j)
    return origin, ({self._text_field: line} if self._text_field else line)


class ListSource:
  """Records already in memory: `(origin, payload)` pairs."""

  def __init__(self, records: Sequence[tuple[str, Any]]):
    self._records = list(records)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> tuple[str, Any]:
    return self._records[i]


def parquet_source(files: Sequence[str]) -> ListSource:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  records = []
  for path in files:
    try:
      rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a broken file.
      raise errors.DataError(f"{path}: cannot read parquet ({e})") from None
    records.extend((f"{path}:row{i}", r) for i, r in enumerate(rows))
  return ListSource(records)


def synthetic_source(cfg: DataConfig) -> ListSource:
  from tunejax.data import synthetic  # pylint: disable=g-import-not-at-top
  rows = synthetic.make_examples(cfg.synthetic_task, cfg.synthetic_size,
                                 cfg.synthetic_seed)
  return ListSource([(f"synthetic:{cfg.synthetic_task}:{i}", r)
                     for i, r in enumerate(rows)])


def open_source(cfg: DataConfig):
  """The record source named by `cfg.source` / `cfg.path`."""
  if cfg.source == "jsonl":
    return LineSource(expand_paths(cfg.path, "jsonl"))
  if cfg.source == "text":
    return LineSource(expand_paths(cfg.path, "text"), text_field=cfg.text_field)
  if cfg.source == "parquet":
    return parquet_source(expand_paths(cfg.path, "parquet"))
  if cfg.source == "synthetic":
    return synthetic_source(cfg)
  if cfg.source == "tfds":
    from tunejax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    return tfds_builder.open_tfds(cfg.path, cfg.split, cfg.tfds_data_dir)
  raise errors.ConfigError(f"config.data.source: unknown {cfg.source!r}")
