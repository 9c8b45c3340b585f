"""Benchmark: fused token loss vs naive logits (JAX) and torch cross_entropy.

For each (N, D, V): forward+backward of a masked mean cross-entropy + z-loss
w.r.t. (h, w), bf16 inputs. Reports the compiled temp bytes
(`memory_analysis()`, compile only) and, when the naive program fits in the
free RAM, wall time (best of --repeats runs after one warm-up: the minimum
is the least noisy estimate on a shared machine).

  python bench/token_loss.py                       # the two issue sizes
  python bench/token_loss.py --sizes 1024x640x32768 --repeats 3
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import torch

from tunejax import kernels

DEFAULT_SIZES = ("4096x640x262144", "8192x2048x128256")
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
  fn()  # warm-up (and compile for torch / lazy paths)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


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


def bench(n, d, v, repeats, run_limit):
  compiled, temp = {}, {}
  for impl in IMPLS:
    compiled[impl] = loss_fn(impl).lower(*_abstract(n, d, v)).compile()
    temp[impl] = compiled[impl].memory_analysis().temp_size_in_bytes
  print(f"\nN={n} D={d} V={v}")
  for impl in IMPLS:
    print(f"  {impl:6s} temp {temp[impl] / 2**20:10.1f} MiB")
  print(f"  temp ratio naive/fused: {temp['naive'] / temp['xla']:.0f}x")
  # Naive temp + bf16 args/grads + the float32 host copies made here.
  need = temp["naive"] + (n * d + d * v) * (2 * 2 + 4 * 2)
  avail = psutil.virtual_memory().available
  if need > run_limit * avail:
    print(f"  not run: naive needs ~{need / 2**30:.1f} GiB, "
          f"{avail / 2**30:.1f} GiB free")
    return
  h, w, y = _inputs(n, d, v)
  args = (jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16),
          jnp.asarray(y))
  secs = {impl: _time(lambda c=compiled[impl]: jax.block_until_ready(
      c(*args)), repeats) for impl in IMPLS}
  secs["torch"] = _torch_time(h, w, y, repeats)
  for name, s in secs.items():
    print(f"  {name:6s} fwd+bwd {s:8.3f} s")
  print(f"  time ratio fused/naive: {secs['xla'] / secs['naive']:.2f}  "
        f"fused/torch: {secs['xla'] / secs['torch']:.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                      help="NxDxV triples")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--run_limit", type=float, default=0.8,
                      help="run only if naive needs < this share of free RAM")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  for size in args.sizes:
    bench(*map(int, size.split("x")), args.repeats, args.run_limit)


if __name__ == "__main__":
  main()
