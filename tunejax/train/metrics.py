"""Metrics sinks: metrics.jsonl, TensorBoard (tensorboardX), tqdm progress.

Only process 0 writes. `metrics.jsonl` has one JSON object per logged step
(always `step`; train steps add `loss`, `lr`, `grad_norm`,
`tokens_per_sec`, ..., and the first of a run `first_step_s`, the
compilation; eval metrics are prefixed `eval/`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Mapping

import jax
import numpy as np


def _py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class Throughput:
  """Tokens per second of training between log rows.

  Device work is asynchronous, so time is read only where the host waits
  anyway. Left out of the rate: the first step of a run (compilation,
  reported once as `first_step_s`; only a first step that is itself logged
  stays in its row's rate) and whatever runs under `pause` (evals,
  checkpoint saves).
  """

  def __init__(self):
    self._first = None
    self.restart()

  def restart(self):
    self.tokens, self._t0, self._paused = 0.0, time.perf_counter(), 0.0

  def seconds(self) -> float:
    return time.perf_counter() - self._t0 - self._paused

  def step_done(self, tokens: float, outputs, log_now: bool):
    """Counts a dispatched step's tokens; times the run's first step."""
    self.tokens += tokens
    if self._first is None:
      jax.block_until_ready(outputs)
      self._first = {"first_step_s": self.seconds()}
      if not log_now:
        self.restart()

  def row(self) -> dict:
    """{'tokens_per_sec'[, 'first_step_s']} for a log row; restarts."""
    out = {"tokens_per_sec": self.tokens / max(self.seconds(), 1e-9),
           **self._first}
    self._first = {}
    self.restart()
    return out

  @contextlib.contextmanager
  def pause(self, state):
    jax.block_until_ready(state)  # steps queued so far count as training
    t = time.perf_counter()
    yield
    self._paused += time.perf_counter() - t


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
    evals = {k: v for k, v in row.items() if k.startswith("eval/")}
    if evals:  # the before / during / after numbers a user watches for
      line = f"eval @ step {row['step']}: " + "  ".join(
          f"{k[5:]} {v:.4g}" for k, v in evals.items()
          if isinstance(v, (int, float)))
      if self._bar is not None:
        self._bar.write(line)
      else:
        print(line, flush=True)

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
