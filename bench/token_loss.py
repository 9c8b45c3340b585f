"""Benchmark: fused token loss vs naive logits (JAX) and torch cross_entropy.

For each (N, D, V): forward+backward of a masked mean cross-entropy + z-loss
w.r.t. (h, w), bf16 inputs. Reports the compiled temp bytes
(`memory_analysis()`, compile only) and, when the naive program fits in the
free RAM, wall time (best of --repeats runs after one warm-up: the minimum
is the least noisy estimate on a shared machine).

  python bench/token_loss.py                       # default sizes
  python bench/token_loss.py --sizes 1024x640x32768 --repeats 3
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import torch

from tunejax import kernels
from timing import best_of  # bench/timing.py

# The two sizes, plus a quarter of the first that lets the naive
# program run next to other jobs on a 24 GiB machine.
DEFAULT_SIZES = ("1024x640x262144", "4096x640x262144", "8192x2048x128256")
IMPLS = ("naive", "xla")


def loss_fn(impl):
  def loss(h, w, y):
    st = kernels.token_stats(h, w, y, impl=impl)
    valid = y >= 0
    per_tok = -st.logp + 1e-4 * st.lse**2
    return jnp.sum(jnp.where(valid, per_tok, 0.0)) / jnp.sum(valid)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _abstract(n, d, v):
  return (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
          jax.ShapeDtypeStruct((n,), jnp.int32))


def _time(fn, repeats):
  return best_of(fn, repeats, warmup=True)


def _inputs(n, d, v, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
  y = rng.integers(0, v, n).astype(np.int32)
  y[::17] = -1  # some ignored positions
  return h, w, y


def _torch_time(h, w, y, repeats):
  th = torch.tensor(h, dtype=torch.bfloat16, requires_grad=True)
  tw = torch.tensor(w, dtype=torch.bfloat16, requires_grad=True)
  ty = torch.tensor(y, dtype=torch.int64)

  def step():
    th.grad = tw.grad = None
    logits = (th @ tw).float()
    valid = ty >= 0
    loss = torch.nn.functional.cross_entropy(logits, ty, ignore_index=-1)
    loss = loss + 1e-4 * (torch.logsumexp(logits, -1)[valid] ** 2).mean()
    loss.backward()

  return _time(step, repeats)


def bench(n, d, v, repeats, run_limit, max_tflop):
  compiled, temp = {}, {}
  for impl in IMPLS:
    compiled[impl] = loss_fn(impl).lower(*_abstract(n, d, v)).compile()
    temp[impl] = compiled[impl].memory_analysis().temp_size_in_bytes
  print(f"\nN={n} D={d} V={v}")
  for impl in IMPLS:
    print(f"  {impl:6s} temp {temp[impl] / 2**20:10.1f} MiB")
  print(f"  temp ratio naive/fused: {temp['naive'] / temp['xla']:.0f}x")
  tflop = 2 * n * d * v / 1e12
  if tflop > max_tflop:
    print(f"  not run: one h @ w is {tflop:.1f} TFLOP (> --max_tflop)")
    return
  # Each program runs only if it fits comfortably in the free RAM (the
  # machine is shared: an OOM kill may hit someone else's process). Host
  # copies made here: float64 draws, float32 arrays, bf16 device arrays.
  host = (n * d + d * v) * (8 + 4 + 2 * 2)
  fits = lambda need: need + host < run_limit * psutil.virtual_memory(
      ).available
  h, w, y = _inputs(n, d, v)
  args = (jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
          jnp.asarray(y))
  secs = {}
  for impl in IMPLS:
    if fits(temp[impl]):
      secs[impl] = _time(lambda c=compiled[impl]: jax.block_until_ready(
          c(*args)), repeats)
  # torch holds bf16 and float32 logits, their grads and the softmax.
  if fits(n * v * (2 + 4 * 3)):
    secs["torch"] = _torch_time(h, w, y, repeats)
  for name in ("naive", "xla", "torch"):
    shown = f"{secs[name]:8.3f} s" if name in secs else "not run (RAM)"
    print(f"  {name:6s} fwd+bwd {shown}")
  if "naive" in secs and "xla" in secs:
    print(f"  time ratio fused/naive: {secs['xla'] / secs['naive']:.2f}")
  if "torch" in secs and "xla" in secs:
    print(f"  time ratio fused/torch: {secs['xla'] / secs['torch']:.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                      help="NxDxV triples")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--max_tflop", type=float, default=2.0,
                      help="compile only when one h @ w exceeds this")
  parser.add_argument("--run_limit", type=float, default=0.5,
                      help="run a program only if it needs < this share of "
                      "the free RAM")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  for size in args.sizes:
    bench(*map(int, size.split("x")), args.repeats, args.run_limit,
          args.max_tflop)


if __name__ == "__main__":
  main()
