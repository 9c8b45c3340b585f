"""Benchmark: fused token loss vs naive logits (JAX), tokamax and torch.

For each (N, D, V): forward+backward of a masked mean cross-entropy + z-loss
(`--loss ce_z`; or a plain mean cross-entropy over every token, `--loss ce`)
w.r.t. (h, w) (or h alone, or none: --grads), bf16 inputs (--dtype).
With `--loss ce` tokamax's `linear_softmax_cross_entropy_loss` runs too
(the same loss; it has no ignored targets or z-loss): its Pallas Mosaic
kernel on a TPU, its full-logits XLA path elsewhere.
Reports the compiled temp bytes
(`memory_analysis()`, compile only) and, when the naive program fits in the
free memory, wall time (best of --repeats runs after one warm-up: the
minimum is the least noisy estimate on a shared machine) and how far each
fused result is from the naive one. On a GPU or TPU the backend's Pallas
body runs too, and torch runs on CUDA when it sees a GPU.

  python bench/token_loss.py                       # default sizes
  python bench/token_loss.py --sizes 1024x640x32768 --repeats 3
  python bench/token_loss.py --sizes 4096x640x262144 --sweep xla:4096x4096
  python bench/token_loss.py --loss ce            # with tokamax
"""
import argparse
import os
import sys

# torch shares the GPU with JAX here: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from tunejax import kernels  # noqa: E402
from timing import best_of  # bench/timing.py  # noqa: E402

# The two sizes, plus a quarter of the first that lets the naive
# program run next to other jobs on a 24 GiB machine.
DEFAULT_SIZES = ("1024x640x262144", "4096x640x262144", "8192x2048x128256")


try:
  import tokamax  # noqa: E402
except ImportError:  # an optional contender (pip install tokamax)
  tokamax = None

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = [jnp.bfloat16]  # of h and w; --dtype
LOSS = ["ce_z"]  # --loss


def impls():
  on_cpu = jax.default_backend() == "cpu"
  names = ("naive", "xla", "xla3") if on_cpu else (
      "naive", "xla", "xla3", "pallas")
  return names + (("tokamax",) if tokamax and LOSS[0] == "ce" else ())


def _tokens_loss(logp, lse, valid):
  """The benchmarked scalar from per-token log-probs and normalisers."""
  if LOSS[0] == "ce":
    return -jnp.mean(logp)
  per_tok = -logp + 1e-4 * lse**2
  return jnp.sum(jnp.where(valid, per_tok, 0.0)) / jnp.sum(valid)


def loss_fn(impl, block_n=None, block_v=None, grads=(0, 1)):
  """jit of the loss and its gradients w.r.t. `grads` (argnums; () for
  the loss alone)."""
  def loss(h, w, y):
    if impl == "tokamax":  # implementation=None: the best for the backend
      return tokamax.linear_softmax_cross_entropy_loss(h, y, w,
                                                       reduction="mean")
    if impl == "xla3":  # the gradient formed in the forward pass
      valid = y >= 0
      wt = (jnp.ones_like(y, jnp.float32) if LOSS[0] == "ce" else
            valid.astype(jnp.float32)) / (y.size if LOSS[0] == "ce" else
                                          jnp.sum(valid))
      terms = kernels.cross_entropy_terms(
          z_loss=0.0 if LOSS[0] == "ce" else 1e-4)
      return kernels.token_loss(h, w, y, terms, wt, block_n=block_n,
                                block_v=block_v)[0]
    st = kernels.token_stats(h, w, y, impl=impl, block_n=block_n,
                             block_v=block_v)
    return _tokens_loss(st.logp, st.lse, y >= 0)
  if not grads:
    return jax.jit(lambda h, w, y: (loss(h, w, y), ()))
  return jax.jit(jax.value_and_grad(loss, argnums=grads))


def _abstract(n, d, v):
  return (jax.ShapeDtypeStruct((n, d), DTYPE[0]),
          jax.ShapeDtypeStruct((d, v), DTYPE[0]),
          jax.ShapeDtypeStruct((n,), jnp.int32))


def _time(fn, repeats):
  return best_of(fn, repeats, warmup=True)


def _free_bytes():
  """Free memory of the device the programs run on."""
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return psutil.virtual_memory().available


def _rel_err(a, b):
  a, b = (np.asarray(x, np.float64) for x in (a, b))
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(n, d, v, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
  y = rng.integers(0, v, n).astype(np.int32)
  if LOSS[0] == "ce_z":
    y[::17] = -1  # some ignored positions
  return h, w, y


def _torch_time(h, w, y, repeats, grads):
  kw = dict(dtype=getattr(torch, DTYPE[0].__name__), device=TORCH_DEVICE)
  th = torch.tensor(h, requires_grad=0 in grads, **kw)
  tw = torch.tensor(w, requires_grad=1 in grads, **kw)
  ty = torch.tensor(y, dtype=torch.int64, device=TORCH_DEVICE)

  def step():
    th.grad = tw.grad = None
    logits = (th @ tw).float()
    loss = torch.nn.functional.cross_entropy(logits, ty, ignore_index=-1)
    if LOSS[0] == "ce_z":
      valid = ty >= 0
      loss = loss + 1e-4 * (torch.logsumexp(logits, -1)[valid] ** 2).mean()
    if grads:
      loss.backward()
    if TORCH_DEVICE == "cuda":
      torch.cuda.synchronize()

  return _time(step, repeats)


def bench(n, d, v, repeats, run_limit, max_tflop, grads):
  names = impls()
  compiled, temp = {}, {}
  for impl in names:
    compiled[impl] = loss_fn(impl, grads=grads).lower(
        *_abstract(n, d, v)).compile()
    temp[impl] = compiled[impl].memory_analysis().temp_size_in_bytes
  print(f"\nN={n} D={d} V={v}")
  for impl in names:
    print(f"  {impl:8s} temp {temp[impl] / 2**20:10.1f} MiB")
  for impl in names[1:]:
    print(f"  temp ratio naive/{impl}: {temp['naive'] / temp[impl]:.0f}x")
  tflop = 2 * n * d * v / 1e12
  if tflop > max_tflop:
    print(f"  not run: one h @ w is {tflop:.1f} TFLOP (> --max_tflop)")
    return
  # Each program runs only if it fits comfortably in the free memory (a
  # shared machine: an OOM kill may hit someone else's process). Host
  # copies made here: float64 draws, float32 arrays, device arrays.
  host = (n * d + d * v) * (8 + 4 + 2 * 2)
  fits = lambda need: need + host < run_limit * _free_bytes()
  h, w, y = _inputs(n, d, v)
  args = (jnp.asarray(h, DTYPE[0]), jnp.asarray(w, DTYPE[0]),
          jnp.asarray(y))
  secs, results = {}, {}
  for impl in names:
    if fits(temp[impl]):
      run = lambda c=compiled[impl]: jax.block_until_ready(c(*args))
      secs[impl] = _time(run, repeats)
      results[impl] = jax.tree.map(np.asarray, run())
  # torch holds input-dtype and float32 logits, their grads and softmax.
  if fits(n * v * (2 + 4 * 3)):
    secs["torch"] = _torch_time(h, w, y, repeats, grads)
  for name in names + ("torch",):
    shown = f"{secs[name]:8.3f} s" if name in secs else "not run (memory)"
    print(f"  {name:8s} {shown}")
  if "naive" in secs:
    print_floor(n, d, v, grads, secs["naive"], repeats)
  for impl in names[1:]:
    if "naive" in results and impl in results:
      (loss, ds), (loss0, ds0) = results[impl], results["naive"]
      errs = " ".join(f"{name} {_rel_err(a, b):.1e}"
                      for name, a, b in zip(("dh", "dw"), ds, ds0))
      print(f"  {impl}: |loss - naive| {abs(loss - loss0):.2e}, rel err "
            f"{errs}")
    for base in ("naive", "tokamax", "torch"):
      if base != impl and base in secs and impl in secs:
        print(f"  time ratio {impl}/{base}: {secs[impl] / secs[base]:.2f}")


def matmul_rate(n, d, repeats, block_v=8192):
  """Best FLOP/s of one `[n, d] @ [d, block_v]` tile product, over the
  input dtype and float32 (a vocabulary tile of either path)."""
  rates = []
  for dtype in {DTYPE[0], jnp.float32}:
    a = jnp.ones((n, d), dtype)
    b = jnp.ones((d, block_v), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b,
                                      preferred_element_type=jnp.float32))
    secs = _time(lambda: mm(a, b).block_until_ready(), max(repeats, 5))
    rates.append(2 * n * d * block_v / secs)
  return max(rates)


def print_floor(n, d, v, grads, naive_secs, repeats):
  """The matmul-only time of the loss at this machine's tile rate: the
  logits, plus one product per gradient taken (dh = g w^T, dw = h^T g).
  No implementation can beat it, however it streams the logits."""
  rate = matmul_rate(n, d, repeats)
  floor = (1 + len(grads)) * 2 * n * d * v / rate
  print(f"  matmul floor ({1 + len(grads)} products at {rate / 1e9:.0f} "
        f"GFLOP/s): {floor:.3f} s = {floor / naive_secs:.2f}x naive")


def sweep(n, d, v, specs, repeats, grads):
  """Times the fused op for each `impl:BNxBV` tile spec (tuning)."""
  h, w, y = _inputs(n, d, v)
  args = (jnp.asarray(h, DTYPE[0]), jnp.asarray(w, DTYPE[0]),
          jnp.asarray(y))
  print(f"\nN={n} D={d} V={v}: tile sweep")
  for spec in specs:
    impl, tiles = spec.split(":")
    bn, bv = map(int, tiles.split("x"))
    c = loss_fn(impl, bn, bv, grads).lower(*_abstract(n, d, v)).compile()
    temp = c.memory_analysis().temp_size_in_bytes
    secs = _time(lambda: jax.block_until_ready(c(*args)), repeats)
    print(f"  {spec:20s} {secs * 1e3:9.2f} ms  temp {temp / 2**20:8.1f} MiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                      help="NxDxV triples")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--max_tflop", type=float, default=None,
                      help="compile only when one h @ w exceeds this "
                      "(default: 2 on a CPU, 100 on an accelerator)")
  parser.add_argument("--run_limit", type=float, default=0.5,
                      help="run a program only if it needs < this share of "
                      "the free memory")
  parser.add_argument("--sweep", nargs="*", default=(),
                      help="impl:BNxBV tile specs to time instead of the "
                      "comparison (e.g. xla:2048x4096 pallas:64x128)")
  parser.add_argument("--grads", default="hw", choices=("hw", "h", "none"),
                      help="gradients taken: w.r.t. h and w, h alone (a "
                      "frozen unembedding, as in LoRA), or none (forward)")
  parser.add_argument("--dtype", default="bfloat16",
                      choices=("bfloat16", "float32"))
  parser.add_argument("--loss", default="ce_z", choices=("ce_z", "ce"),
                      help="masked CE + z-loss, or plain mean CE over every "
                      "token (adds tokamax when it is installed)")
  args = parser.parse_args()
  LOSS[0] = args.loss
  if args.max_tflop is None:
    args.max_tflop = 2.0 if jax.default_backend() == "cpu" else 100.0
  DTYPE[0] = jnp.dtype(args.dtype).type
  grads = {"hw": (0, 1), "h": (0,), "none": ()}[args.grads]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} on {TORCH_DEVICE} "
        f"({torch.get_num_threads()} threads)")
  if "tokamax" in impls():
    from absl import flags  # tokamax reads its absl flags: mark them parsed
    flags.FLAGS([sys.argv[0]])
    from tokamax._src.ops.linear_softmax_cross_entropy_loss import api
    print(f"tokamax {tokamax.__version__}: {next(iter(api.IMPLEMENTATIONS))}"
          " implementation")
  for size in args.sizes:
    if args.sweep:
      sweep(*map(int, size.split("x")), args.sweep, args.repeats, grads)
      continue
    bench(*map(int, size.split("x")), args.repeats, args.run_limit,
          args.max_tflop, grads)


if __name__ == "__main__":
  main()
