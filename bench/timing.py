"""Shared timing helper for the bench scripts (run as `python bench/X.py`)."""
import os
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


def step_stats(step, steps: int, tokens_per_step: int) -> dict:
  """Times `step()` once (compile + first run), then `steps` more times.

  Reports the fastest step (the least disturbed by other tenants of a
  shared machine) and the median, as tokens/s and seconds per step.
  """
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  times.sort()
  best, median = times[0], times[len(times) // 2]
  return {"tokens_per_sec": tokens_per_step / best, "step_s": best,
          "median_tokens_per_sec": tokens_per_step / median,
          "compile_s": compile_s}


def matmul_peak(n: int = 2048) -> dict:
  """The f32 matmul rate of this machine in JAX (an n^3 product, ten runs
  back to back), as {"tflops": ...}: the peak that model FLOP/s are
  measured against."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(10):
    y = f(x)
  y.block_until_ready()
  return {"tflops": 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12}


def best_round(old: dict | None, new: dict) -> dict:
  """Merges one contender's results over interleaved rounds: the faster
  round (tokens/s, or TFLOP/s for the peak; for timing-only results such
  as `products` and `parts`, each shorter time), with the larger peak RSS."""
  if old is None:
    return new
  if "tokens_per_sec" not in new and "tflops" not in new:
    return {**new, **{k: min(old[k], v) for k, v in new.items()
                      if k.endswith("_s")}}
  speed = "tokens_per_sec" if "tokens_per_sec" in new else "tflops"
  best = dict(max(old, new, key=lambda r: r[speed]))
  for mem in ("rss_mb", "mem_mb"):
    if mem in best:
      best[mem] = max(old[mem], new[mem])
  return best


def child_env(hugepages: bool) -> dict:
  """The environment of a contender's subprocess: with `hugepages`, glibc's
  huge-page malloc tunable (as `python -m tunejax.main` sets for itself),
  for every contender alike."""
  from tunejax import host  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  return (host.hugepage_env(env) or env) if hugepages else env


def add_hugepages_flag(parser) -> None:
  parser.add_argument(
      "--hugepages", default="true", choices=["true", "false"],
      help="start every contender's process with glibc's huge-page malloc "
      "tunable, as tunejax.main does")
