"""Packing documents into fixed-length rows.

Best-fit decreasing over a window of units: units are placed longest first
into the open row with the least room that still fits, so rows fill up
tightly without reordering the stream beyond the window. A unit of parallel
documents (a preference pair) occupies the same segment of every parallel
row with its longest member's length, so row i of `chosen_*` and row i of
`rejected_*` always hold the same pairs in the same segments.

Row layout (all `[seq_len]`): `tokens`, `targets`, `loss_mask`,
`segment_ids` (1..n per document, 0 = padding), `positions` (0.. per
document), `weights`. Padding has `loss_mask = weights = segment_ids = 0`.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from tunejax.data.formats import Doc, Unit

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions",
            "weights")


def unit_length(unit: Unit) -> int:
  return max(len(doc[0]) for doc in unit)


def best_fit_decreasing(lengths: Sequence[int], capacity: int
                        ) -> list[list[int]]:
  """Bins of item indices, each bin's total length <= capacity.

  Deterministic: ties are broken by item index, and items keep their stream
  order inside a bin. Bins come out in creation order.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  free: list[tuple[int, int]] = []  # sorted (room left, bin id)
  bins: list[list[int]] = []
  for i in order:
    need = lengths[i]
    if need > capacity:
      raise ValueError(f"item {i} of length {need} exceeds capacity "
                       f"{capacity}")
    k = bisect.bisect_left(free, (need, -1))
    if k < len(free):
      room, b = free.pop(k)
      bins[b].append(i)
    else:
      room, b = capacity, len(bins)
      bins.append([i])
    bisect.insort(free, (room - need, b))
  return [sorted(b) for b in bins]


def _row(docs: Sequence[Doc], seq_len: int, pad_id: int
         ) -> dict[str, np.ndarray]:
  row = {
      "tokens": np.full(seq_len, pad_id, np.int32),
      "targets": np.full(seq_len, pad_id, np.int32),
      "loss_mask": np.zeros(seq_len, np.float32),
      "segment_ids": np.zeros(seq_len, np.int32),
      "positions": np.zeros(seq_len, np.int32),
      "weights": np.zeros(seq_len, np.float32),
  }
  start = 0
  for seg, (tokens, targets, mask, weights) in enumerate(docs, 1):
    end = start + len(tokens)
    row["tokens"][start:end] = tokens
    row["targets"][start:end] = targets
    row["loss_mask"][start:end] = mask
    row["weights"][start:end] = weights
    row["segment_ids"][start:end] = seg
    row["positions"][start:end] = np.arange(end - start)
    start = end
  return row


def pack(units: Sequence[Unit], seq_len: int, pad_id: int, packing: bool
         ) -> list[tuple[dict[str, np.ndarray], ...]]:
  """Units -> rows; each row is a tuple with one dict per parallel document."""
  if not units:
    return []
  if packing:
    bins = best_fit_decreasing([unit_length(u) for u in units], seq_len)
  else:
    bins = [[i] for i in range(len(units))]
  width = len(units[0])
  return [tuple(_row([units[i][k] for i in b], seq_len, pad_id)
                for k in range(width)) for b in bins]


def empty_row(width: int, seq_len: int, pad_id: int
              ) -> tuple[dict[str, np.ndarray], ...]:
  """An all-padding row (pads the last batch of a finite dataset)."""
  return tuple(_row([], seq_len, pad_id) for _ in range(width))
