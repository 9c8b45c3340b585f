"""Checkpoint/resume exactness, SIGTERM and damaged checkpoints."""
import os
import signal

import jax
import numpy as np
import pytest

from tunejax import train
from tunejax.train import metrics as metrics_lib
from tests.train.helpers import tiny_config

N = 3


def _cfg(steps, every=1):
  return tiny_config(total_steps=steps,
                     checkpoint={"every": every, "keep": 5,
                                 "async_save": False},
                     eval={"every": -1})


def _params(out):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(
      out["state"].params))]


def _train_rows(workdir):
  return [r for r in metrics_lib.read(workdir) if "loss" in r]


def _comparable(rows):
  drop = ("tokens_per_sec", "tflops", "mfu", "first_step_s")
  return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  return wd, train.run(_cfg(2 * N), wd)


class _Killed(Exception):
  pass


def _patch_write(monkeypatch, at_step, action):
  """Runs `action()` right after the train metrics of `at_step` are logged."""
  orig = metrics_lib.MetricsWriter.write

  def write(self, step, m):
    orig(self, step, m)
    if step == at_step and "loss" in m:
      action()
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)


def _kill():
  raise _Killed()


def test_resume_is_bitwise(uninterrupted, tmp_path, monkeypatch):
  full_wd, full = uninterrupted
  wd = str(tmp_path)
  with monkeypatch.context() as mp:
    _patch_write(mp, N, _kill)   # dies mid-step N, before its checkpoint
    with pytest.raises(_Killed):
      train.run(_cfg(2 * N), wd)
  resumed = train.run(_cfg(2 * N), wd)   # resumes at N-1
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  assert _comparable(_train_rows(wd)) == _comparable(_train_rows(full_wd))


def test_truncated_latest_checkpoint_falls_back(uninterrupted, tmp_path,
                                               monkeypatch):
  _, full = uninterrupted
  wd = str(tmp_path)
  with monkeypatch.context() as mp:
    _patch_write(mp, N + 1, _kill)
    with pytest.raises(_Killed):
      train.run(_cfg(2 * N), wd)
  # Damage every data file of the newest checkpoint (step N).
  latest = os.path.join(wd, "checkpoints", str(N), "state")
  damaged = 0
  for root, _, files in os.walk(latest):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 16 and "ocdbt" not in f:
        with open(p, "r+b") as fh:
          fh.truncate(os.path.getsize(p) // 2)
        damaged += 1
  assert damaged
  resumed = train.run(_cfg(2 * N), wd)   # falls back to step N-1
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_resume_matches(uninterrupted, tmp_path, monkeypatch):
  """SIGTERM mid-run saves the current step and exits; resume continues."""
  _, full = uninterrupted
  wd = str(tmp_path)
  cfg = _cfg(2 * N, every=1000)
  with monkeypatch.context() as mp:
    _patch_write(mp, N, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = train.run(cfg, wd)
  assert out["preempted"]
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints"))
                if s.isdigit()) == [N]
  resumed = train.run(cfg, wd)
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
