"""task=compile: will this run fit? Compile the train step, train nothing.

  python -m tunejax.main --config=configs/llama3_8b.py \
      --config.task=compile --workdir=W
  # From a CPU machine, for a mesh of 64 devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu \
      python -m tunejax.main --config=... --config.task=compile --workdir=W

Reads the checkpoint's config only (no tensors) and one batch of the
configured data (for its shapes), builds the sharded TrainState abstractly
(`jax.eval_shape`: nothing allocated), then lowers and compiles the train
step for the configured mesh, micro-batches, PEFT method and loss, exactly
as task=sft (or task=dpo, on preference data with an online reference)
would. WORKDIR/compile.json gets the per-device bytes from
`compiled.memory_analysis()`, the compiler's FLOP count, the model FLOPs
per token and the compile time; one summary line is printed.

On the target accelerator the bytes are that hardware's (and are compared
with the device's memory limit where the runtime reports one). Compiled for
fake CPU devices they estimate how the state splits over the mesh, while
temporaries depend on the backend's fusion and layouts.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from tunejax import data, errors
from tunejax.train import loop, setup
from tunejax.train.config import Config


def _size(n: int) -> str:
  for unit, b in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= b:
      return f"{n / b:.2f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def _per_device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs
  (the largest shard, so uneven splits are not under-counted)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def _memory_limit() -> int | None:
  """The first local device's memory limit in bytes, if the runtime has one
  (TPU/GPU; None on CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return (stats or {}).get("bytes_limit")


def _first_batch(cfg: Config, run, tokenizer):
  """One global batch of the configured data (shapes and dtypes as in
  training)."""
  it = loop.data_iterator(cfg.data, tokenizer, cfg.seed)
  return data.to_global(next(it), run.mesh, run.batch_sharding)


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one dict per program on old jax
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def compile_report(cfg: Config, workdir: str, tokenizer) -> dict:
  """Compiles the run's train step (task=sft's, or task=dpo's with
  preference data and loss); writes WORKDIR/compile.json and returns its
  contents."""
  if cfg.loss.reference == "precomputed" or cfg.loss.name == "treg":
    raise errors.ConfigError(
        "config.task=compile: compiles the step with an online reference; "
        "precomputed reference/T-REG tables need the weights (set "
        "loss.reference=online and a non-treg loss to size the step)")
  model_cfg, _ = setup.load_model(cfg.model, weights=False)
  state, run = setup.abstract_state(cfg, model_cfg)
  batch = _first_batch(cfg, run, tokenizer)
  key = jax.ShapeDtypeStruct((2,), np.uint32,
                             sharding=jax.sharding.NamedSharding(
                                 run.mesh, jax.sharding.PartitionSpec()))
  t0 = time.perf_counter()
  compiled = setup.jit_train_step(run, cfg.micro_batches).lower(
      state, batch, key).compile()
  secs = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  tokens = sum(int(np.prod(v.shape)) for k, v in batch.items()
               if k.endswith("tokens"))  # both sides of preference pairs
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  limit = _memory_limit()
  report = {
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "mesh": dict(run.mesh.shape),
      "compile_s": round(secs, 3),
      "tokens_per_step": tokens,
      "state_bytes_per_device": {
          "params": _per_device_bytes(state.params),
          "frozen": _per_device_bytes(state.frozen),
          "opt_state": _per_device_bytes(state.opt_state),
          "total": _per_device_bytes(state)},
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      # Donated state aliases its outputs: arguments + outputs - aliased +
      # temporaries is what the step holds at once.
      "peak_bytes_per_device": peak,
      "memory_limit_bytes": limit,
      "fits": None if limit is None else bool(peak <= limit),
      "compiler_flops_per_device": _flops(compiled),
      "model_flops_per_token": model_cfg.flops_per_token(
          cfg.data.seq_len, weight_grads=run.method.trains_base_weights),
  }
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "compile.json.tmp")
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "compile.json"))
  fit = "" if limit is None else f" of {_size(limit)} " + (
      "(fits)" if report["fits"] else "(DOES NOT FIT)")
  print(f"compiled the train step for {report['devices']} x "
        f"{report['device_kind']} (mesh {report['mesh']}) in {secs:.1f} s: "
        f"per device {_size(peak)}{fit}: state "
        f"{_size(report['state_bytes_per_device']['total'])}, temporaries "
        f"{_size(mem.temp_size_in_bytes)}; details in compile.json")
  return report
