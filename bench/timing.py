"""Shared timing helper for the bench scripts (run as `python bench/X.py`)."""
import time


def best_of(fn, repeats: int, *, warmup: bool = False) -> float:
  """Minimum wall time of `fn()` over `repeats` calls (after an optional
  untimed warm-up call that compiles lazy paths)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)
