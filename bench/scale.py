"""Compile (not run) a Llama-3-8B-shaped train step on 64 fake CPU devices.

Prints per-device argument/temp bytes from `compiled.memory_analysis()` next
to total-state/64 (FSDP should divide the state evenly), and the compile
time for 8 vs 32 layers (scan over layers keeps it flat).

  python bench/scale.py [--method=lora|none] [--layers=8,32]
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=64"

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tunejax import config as config_lib, models, tree  # noqa: E402
from tunejax.train import config as tcfg, setup  # noqa: E402


def compile_step(method: str, n_layers: int, seq: int, batch: int):
  cfg = config_lib.build(tcfg.Config, dict(
      model=dict(name="llama3-8b", dtype="bfloat16", param_dtype="bfloat16",
                 remat="full", overrides={"n_layers": n_layers}),
      peft=(dict(method="lora", rank=16, alpha=32.0) if method == "lora"
            else dict(method="none")),
      mesh=dict(data=1, fsdp=64, tensor=1),
      data=dict(source="synthetic", seq_len=seq, batch_size=batch)), "")
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.abstract_state(cfg, model_cfg)
  spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                              sharding=run.batch_sharding)
  fspec = jax.ShapeDtypeStruct((batch, seq), jnp.float32,
                               sharding=run.batch_sharding)
  batch_ = {"tokens": spec, "targets": spec, "segment_ids": spec,
            "positions": spec, "loss_mask": fspec}
  key = jax.ShapeDtypeStruct((2,), jnp.uint32,
                             sharding=NamedSharding(run.mesh, P()))
  t = time.perf_counter()
  lowered = setup.jit_train_step(run, 1).lower(state, batch_, key)
  compiled = lowered.compile()
  return compiled, state, time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--method", default="lora", choices=["lora", "none"])
  p.add_argument("--layers", default="8,32")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--batch", type=int, default=64)
  a = p.parse_args()
  print(f"{jax.device_count()} devices; Llama-3-8B shapes, bf16, {a.method}, "
        f"batch {a.batch} x seq {a.seq}, fsdp=64")
  for n in [int(x) for x in a.layers.split(",")]:
    compiled, state, secs = compile_step(a.method, n, a.seq, a.batch)
    mem = compiled.memory_analysis()
    total = tree.nbytes(state)
    print(f"layers={n:3d}: compile {secs:6.1f} s | state {total / 2**30:7.2f} "
          f"GiB total, /64 = {total / 64 / 2**20:8.1f} MiB | per device: "
          f"args {mem.argument_size_in_bytes / 2**20:8.1f} MiB, temp "
          f"{mem.temp_size_in_bytes / 2**20:8.1f} MiB, out "
          f"{mem.output_size_in_bytes / 2**20:8.1f} MiB")


if __name__ == "__main__":
  main()
