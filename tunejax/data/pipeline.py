"""Host input pipeline: source, shard, shuffle, format, pack, batch.

The random-access part runs on grain `MapDataset`s: each process takes the
records `process_index::process_count` (disjoint and covering), shuffles its
shard with a seed (reshuffled every epoch by grain), repeats, and formats
records lazily. Packing reads `pack_window` consecutive records at a time, so
the iterator's whole position is `(window_start, rows_done)`: restoring
re-reads and re-packs that window (deterministic) and skips the rows already
served. The state is a small JSON-serialisable dict, and a restored iterator
yields exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

from absl import logging
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from tunejax import errors
from tunejax.data import formats, packing, sources
from tunejax.data.config import DataConfig

_MAX_LOGGED = 5
_STATE_VERSION = 1


def _record_stats() -> dict[str, Any]:
  return {"records": 0, "examples": 0, "documents": 0, "bad_rows": 0,
          "epoch_examples": 0, "first_bad": []}


def _row_stats() -> dict[str, int]:
  return {"rows": 0, "tokens": 0, "target_tokens": 0, "slots": 0}


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """Host-local batches (`rows = batch_size / process_count`) with state."""

  def __init__(self, cfg: DataConfig, ds: grain.MapDataset, *, pad_id: int,
               shard_len: int, rows: int, fingerprint: dict[str, Any]):
    self._cfg = cfg
    self._ds = ds
    self._pad_id = pad_id
    self._shard_len = shard_len
    self._rows_per_batch = rows
    self._fingerprint = fingerprint
    self._width = 2 if cfg.format == "preference" else 1
    self._keep_weights = bool(cfg.weights_field or cfg.spans_field)
    self._records = _record_stats()
    self._records_at_window = _record_stats()
    self._rows = _row_stats()
    self._window: list = []
    self._window_start = 0
    self._rows_done = 0
    self._next_record = 0
    self._loaded = False  # whether `_window` holds the window at its start

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    while len(rows) < self._rows_per_batch:
      row = self._next_row()
      if row is None:
        break
      rows.append(row)
    if not rows:
      raise StopIteration
    # A finite dataset's last batch is padded with empty rows (no loss), so
    # every token is served and shapes stay fixed.
    empty = packing.empty_row(self._width, self._cfg.seq_len, self._pad_id)
    rows += [empty] * (self._rows_per_batch - len(rows))
    self._rows["slots"] += self._cfg.seq_len * self._rows_per_batch
    return self._collate(rows)

  def _next_row(self):
    while self._rows_done >= len(self._window):
      if self._next_record >= len(self._ds):
        return None
      self._load_window(self._next_record)
    row = self._window[self._rows_done]
    self._rows_done += 1
    self._rows["rows"] += 1
    self._rows["tokens"] += int(np.count_nonzero(row[0]["segment_ids"]))
    self._rows["target_tokens"] += int(sum(r["loss_mask"].sum() for r in row))
    return row

  def _load_window(self, start: int) -> None:
    self._window_start = start
    self._records_at_window = copy.deepcopy(self._records)
    end = min(start + self._cfg.pack_window, len(self._ds))
    units = []
    for i in range(start, end):
      item = self._ds[i]
      self._records["records"] += 1
      if isinstance(item, formats.BadRow):
        self._bad_row(item)
      else:
        units.extend(item)
        self._records["examples"] += 1
        self._records["documents"] += len(item)
        self._records["epoch_examples"] += 1
      if (i + 1) % self._shard_len == 0:
        self._end_epoch()
    self._next_record = end
    self._loaded = True
    self._window = packing.pack(units, self._cfg.seq_len, self._pad_id,
                                self._cfg.packing)
    self._rows_done = 0

  def _bad_row(self, bad: formats.BadRow) -> None:
    message = f"{bad.origin}: {bad.reason}"
    if self._cfg.bad_rows == "error":
      raise errors.DataError(message)
    stats = self._records
    stats["bad_rows"] += 1
    if len(stats["first_bad"]) < _MAX_LOGGED:
      stats["first_bad"].append(message)
      logging.warning("skipping bad data row %s", message)

  def _end_epoch(self) -> None:
    # An epoch is a permutation of the shard: no good row in it means that
    # every row is bad, which must stop the run rather than spin forever.
    if not self._records["epoch_examples"]:
      raise errors.DataError(
          f"every row of data.path={self._cfg.path!r} is bad "
          f"({self._shard_len} rows in this process's shard); first: "
          f"{self._records['first_bad'][0]}")
    self._records["epoch_examples"] = 0

  def _collate(self, rows) -> dict[str, np.ndarray]:
    keys = [k for k in packing.ROW_KEYS
            if k != "weights" or self._keep_weights]
    prefixes = ("chosen_", "rejected_") if self._width == 2 else ("",)
    return {p + k: np.stack([row[j][k] for row in rows])
            for j, p in enumerate(prefixes) for k in keys}

  def stats(self) -> dict[str, Any]:
    """Counts so far (restored with the state).

    records / examples / documents / bad_rows (+ first_bad: the first few
    'file:line: reason'), rows (packed, excluding last-batch padding rows),
    tokens (non-padding inputs; the chosen side for preference data),
    target_tokens (loss_mask sum over all sides), slots (served positions),
    packing_efficiency = tokens / (rows * seq_len).
    """
    out = {k: v for k, v in self._records.items() if k != "epoch_examples"}
    out.update(self._rows)
    out["packing_efficiency"] = self._rows["tokens"] / max(
        1, self._rows["rows"] * self._cfg.seq_len)
    return out

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, **self._fingerprint,
            "window_start": int(self._window_start),
            "rows_done": int(self._rows_done),
            "window_loaded": self._loaded,
            "record_stats": copy.deepcopy(self._records_at_window),
            "row_stats": dict(self._rows)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key, want in self._fingerprint.items():
      if state.get(key) != want:
        raise errors.DataError(
            f"data iterator state does not match this pipeline: {key}="
            f"{state.get(key)!r}, expected {want!r}")
    self._records = copy.deepcopy(dict(state["record_stats"]))
    self._records_at_window = copy.deepcopy(self._records)
    self._window, self._rows_done, self._loaded = [], 0, False
    self._window_start = self._next_record = int(state["window_start"])
    if state["window_loaded"]:  # re-pack it (deterministic), skip served rows
      self._load_window(self._window_start)
      self._rows_done = int(state["rows_done"])
    self._rows = dict(state["row_stats"])


def _shard(cfg: DataConfig, process_index: int, process_count: int):
  source = sources.open_source(cfg)
  if len(source) == 0:
    raise errors.DataError(f"data.path={cfg.path!r}: no records")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise errors.DataError(
        f"data.path={cfg.path!r}: {len(source)} records cannot feed "
        f"{process_count} processes")
  return source, ds


def make_iterator(cfg: DataConfig, tokenizer, *, seed: int,
                  process_index: int = 0, process_count: int = 1
                  ) -> DataIterator:
  """The deterministic, resumable batch iterator of this process's shard.

  Batches are dicts of numpy arrays `[batch_size / process_count, seq_len]`:
  `tokens`, `targets`, `loss_mask`, `segment_ids`, `positions`, plus
  `weights` when `weights_field` or `spans_field` is set (zero wherever
  `loss_mask` is); preference batches prefix each key with `chosen_` and
  `rejected_` (row i of one pairs with row i of the other, segment by
  segment). With `num_epochs` set, the last batch is padded with empty rows
  and iteration stops; processes may then differ by a batch, so drive
  multi-host loops by step count.
  """
  if cfg.batch_size % process_count:
    raise errors.ConfigError(
        f"config.data.batch_size: {cfg.batch_size} is not divisible by the "
        f"{process_count} processes")
  source, ds = _shard(cfg, process_index, process_count)
  shuffle_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else seed
  shard_len = len(ds)
  if cfg.shuffle:
    ds = ds.shuffle(seed=int(shuffle_seed) % 2**32)
  ds = ds.repeat(cfg.num_epochs).map(formats.make_formatter(cfg, tokenizer))
  fingerprint = {"shard": [process_index, process_count],
                 "num_records": len(source),
                 "shuffle_seed": int(shuffle_seed) if cfg.shuffle else None}
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return DataIterator(cfg, ds, pad_id=int(pad_id), shard_len=shard_len,
                      rows=cfg.batch_size // process_count,
                      fingerprint=fingerprint)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows split over the mesh's data-parallel axes ('data', 'fsdp')."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes or None))


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
              sharding=None) -> dict[str, jax.Array]:
  """Host-local rows -> global `jax.Array`s sharded over the batch axis.

  `sharding` may be a `jax.sharding.Sharding`, a `PartitionSpec` (on
  `mesh`), a per-key mapping of either, or None (`batch_sharding(mesh)`).
  """
  def resolve(s):
    if s is None:
      return batch_sharding(mesh)
    return NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s
  return {k: jax.make_array_from_process_local_data(
      resolve(sharding.get(k) if isinstance(sharding, Mapping) else sharding),
      v) for k, v in batch.items()}
