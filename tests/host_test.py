"""Host memory housekeeping (tunejax.host)."""
import os

import jax
import numpy as np
import pytest

from tunejax import host


def _resident_bytes():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="needs Linux /proc to read resident memory")
def test_release_returns_freed_small_blocks():
  # What a loader leaves behind: many freed blocks (~330 MB of 16 KiB
  # arrays) between small live ones, so free() cannot merge them into the
  # heap's top and trim it by itself: only malloc_trim returns them.
  blocks, live = [], []
  for _ in range(20_000):
    blocks.append(np.ones(2048))
    live.append(np.ones(64))
  del blocks
  before = _resident_bytes()
  if not host.release_freed_memory():
    pytest.skip("the C library has no malloc_trim")
  # Each 16 KiB hole holds at least three whole 4 KiB pages (240 MB).
  assert before - _resident_bytes() > 160 * 2**20
  del live


def test_release_runs_after_each_compile(monkeypatch):
  calls = []
  monkeypatch.setattr(host, "release_freed_memory",
                      lambda: calls.append(1) or True)
  compiles, counting = [], [True]

  def count(event, secs, **kwargs):
    del secs, kwargs
    if counting[0] and event == "/jax/core/compile/backend_compile_duration":
      compiles.append(1)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    host.release_after_compiles()
    host.release_after_compiles()  # idempotent: one listener
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
  finally:
    counting[0] = False  # listeners cannot be removed; this one goes quiet
  assert compiles and len(calls) == len(compiles)
