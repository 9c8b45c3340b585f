"""Metrics sinks: metrics.jsonl, TensorBoard (tensorboardX), tqdm progress.

Only process 0 writes. `metrics.jsonl` has one JSON object per logged step
(always `step`; train steps add `loss`, `lr`, `grad_norm`,
`tokens_per_sec`, ..., and the first of a run `first_step_s`, the
compilation; eval metrics are prefixed `eval/`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np


def _py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricsWriter:
  """Appends metrics to jsonl/TensorBoard and drives the progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               tensorboard: bool = True, progress: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = self._bar = None
    if not self.enabled:
      return
    _truncate_after(self.path, start_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    if progress and total_steps:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                       dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._bar is not None and "loss" in row:
      self._bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)

  def advance(self, n: int = 1):
    if self._bar is not None:
      self._bar.update(n)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int):
  """Drops rows logged after `step` (a resumed run rewrites them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [l for l in f if l.strip()]
  keep = [l for l in rows if json.loads(l).get("step", 0) <= step]
  if len(keep) != len(rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]
