"""W1 with SpIEL at LoRA r=16's trainable count, vs LoRA r=16 and full FT.

Workload W1 (bench/train_step.py): Llama architecture, vocab 32000, d=512,
8 layers, seq 512, batch 8, AdamW, float32; adapters / sparse deltas on
q,k,v,o,gate,up,down. SpIEL's budget is k = 16·(in + out) per matrix, the
LoRA r=16 parameter count. Each method runs in its own subprocess; prints
tokens/s of the train step, the time of one SpIEL drop/grow event, and the
trainable-state bytes (trainable params + optimizer state; for sparse also
the int32 indices), with the ratio to density x full-FT state.

  python bench/sparse.py [--steps=3] [--batch=8] [--seq=512]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import W1  # noqa: E402  pylint: disable=g-import-not-at-top

PEFT = {"none": {"method": "none"},
        "lora": {"method": "lora", "rank": 16, "alpha": 32.0},
        "spiel": {"method": "spiel", "sparse_match_rank": 16,
                  "spiel_every": 100, "sparse_batches": 1}}


def run_one(a):
  import jax
  import numpy as np
  from tunejax import config as config_lib, data, tree
  from tunejax.train import config as tcfg, loop, setup
  cfg = config_lib.build(tcfg.Config, dict(
      total_steps=1000, model=dict(name="tiny", overrides=W1),
      peft=PEFT[a.only], optim=dict(name="adamw", lr=1e-4),
      mesh=dict(data=1),
      data=dict(source="synthetic", seq_len=a.seq, batch_size=a.batch)), "")
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  step = setup.jit_train_step(run, 1)
  rng = np.random.default_rng(0)
  b, l = a.batch, a.seq
  batch = {"tokens": rng.integers(0, 32000, (b, l)).astype(np.int32),
           "targets": rng.integers(0, 32000, (b, l)).astype(np.int32),
           "loss_mask": np.ones((b, l), np.float32),
           "segment_ids": np.ones((b, l), np.int32),
           "positions": np.broadcast_to(np.arange(l, dtype=np.int32),
                                        (b, l)).copy()}
  g = data.to_global(batch, run.mesh, run.batch_sharding)
  key = jax.random.PRNGKey(0)
  state, m = step(state, g, key)  # compile
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(a.steps):
    state, m = step(state, g, key)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / a.steps
  out = {"tokens_per_sec": b * l / dt, "step_s": dt,
         "trainable": sum(x.size for x in jax.tree.leaves(state.params)),
         "state_bytes": tree.nbytes(state.params) + tree.nbytes(
             state.opt_state)}
  if "peft" in state.frozen:
    out["index_bytes"] = tree.nbytes(state.frozen["peft"])
    ctx = loop.event_context(cfg, run, iter([batch] * 4))
    for label in ("event_first_s", "event_s"):  # compile, then warm
      t = time.perf_counter()
      state = run.method.on_step(state, 100, ctx)
      jax.block_until_ready(state.params)
      out[label] = time.perf_counter() - t
  else:
    out["n_params"] = sum(x.size for x in jax.tree.leaves(state.params))
  print(json.dumps(out))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--only", default="")
  a = p.parse_args()
  if a.only:
    run_one(a)
    return
  res = {}
  for name in PEFT:
    out = subprocess.run(
        [sys.executable, __file__, f"--only={name}", f"--steps={a.steps}",
         f"--batch={a.batch}", f"--seq={a.seq}"],
        capture_output=True, text=True, check=False)
    if out.returncode:
      print(f"{name}: failed\n{out.stderr[-2000:]}")
      continue
    res[name] = json.loads(out.stdout.strip().splitlines()[-1])
  full = res.get("none", {})
  for name, r in res.items():
    line = (f"{name:6s} {r['tokens_per_sec']:8.1f} tok/s  step "
            f"{r['step_s']:.2f}s  trainable {r['trainable']:,}  state "
            f"{r['state_bytes'] / 2**20:.1f} MiB")
    if "event_s" in r:
      line += (f" (+{r['index_bytes'] / 2**20:.1f} MiB indices)  drop/grow "
               f"{r['event_s']:.2f}s (first {r['event_first_s']:.1f}s)")
    print(line)
  if "spiel" in res and full:
    s = res["spiel"]
    density = s["trainable"] / full["n_params"]
    target = density * full["state_bytes"]
    print(f"density {density:.4%}; spiel state / (density x full-FT state) = "
          f"{s['state_bytes'] / target:.2f} (with indices "
          f"{(s['state_bytes'] + s['index_bytes']) / target:.2f}; "
          "target <= 1.2)")
  if "lora" in res and "spiel" in res:
    ratio = res["spiel"]["tokens_per_sec"] / res["lora"]["tokens_per_sec"]
    print(f"spiel / lora tokens/s = {ratio:.2f}")


if __name__ == "__main__":
  main()
