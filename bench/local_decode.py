"""Decode step of a Gemma 3-shaped model deep into a long cache: local
layers reading their window's slots (`layers.cache_window`) vs the whole
cache buffer, each in its own subprocess.

Gemma 3 270M's layer shapes (d 640, 4 heads / 1 KV head of 256, window
512), 5 local + 1 global layers, vocabulary 32000; one new token per row
from slot 2048 of a 2560-slot cache on. The timed step is the layer stack
(the unembedding is the same in both).

  python bench/local_decode.py [--batch 8 --slot 2048 --slots 2560]
"""
import argparse
import importlib
import json
import subprocess
import sys

from timing import best_of  # bench/timing.py


def run(a) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tunejax import models  # pylint: disable=g-import-not-at-top
  from tunejax.models import layers, transformer  # pylint: disable=g-import-not-at-top
  if a.only == "whole":
    layers.cache_window = lambda k, v, mask, *_: (k, v, mask)
  cfg = models.preset("gemma3-270m").replace(
      vocab_size=32000, n_layers=6, layer_types=("local",) * 5 + ("global",))
  params = transformer.split_layers(models.init(cfg, jax.random.key(0)))
  b, s = a.batch, a.slots
  kv = lambda i: jax.random.normal(jax.random.key(i), (
      b, cfg.n_kv_heads, s, cfg.head_dim), jnp.float32)
  # The buffers as generate's loop carries them (updated in place); its
  # layout for whole-buffer reads is the one for virtual tokens (offset 1).
  layout = lambda bufs: importlib.import_module(
      "tunejax.models.generate")._loop_layout(  # pylint: disable=protected-access
          cfg, bufs, int(a.only == "whole"))
  cache = {"k": layout([kv(i) for i in range(cfg.n_layers)]),
           "v": layout([kv(100 + i) for i in range(cfg.n_layers)]),
           "pos": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
           "seg": jnp.ones((b, s), jnp.int32), "slot": jnp.int32(a.slot)}
  ones = jnp.ones((b, 1), jnp.int32)
  # The cache is donated and carried, as in generate's loop (written in
  # place); each step advances the slot by one.
  step = jax.jit(lambda p, c: transformer.decode(
      cfg, p, ones, ones * c["slot"], ones, cache=c)[1], donate_argnums=1)
  box = [cache]

  def one():
    box[0] = step(params, box[0])
    jax.block_until_ready(box[0])

  return best_of(one, a.repeats, warmup=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--slot", type=int, default=2048)
  p.add_argument("--slots", type=int, default=2560)
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--only", default="")
  a = p.parse_args()
  if a.only:
    print(json.dumps(run(a)))
    return
  secs = {}
  for mode in ("window", "whole"):
    out = subprocess.run(
        [sys.executable, __file__, f"--only={mode}", f"--batch={a.batch}",
         f"--slot={a.slot}", f"--slots={a.slots}",
         f"--repeats={a.repeats}"], capture_output=True, text=True,
        check=True)
    secs[mode] = json.loads(out.stdout.splitlines()[-1])
  print(f"decode step at slot {a.slot} of {a.slots}, batch {a.batch}: "
        f"local layers reading their window {secs['window'] * 1e3:.1f} ms, "
        f"the whole cache {secs['whole'] * 1e3:.1f} ms "
        f"({secs['whole'] / secs['window']:.2f}x)")


if __name__ == "__main__":
  main()
