"""PEFT methods side by side on a small CPU task: a report, not a test.

    python bench/peft_compare.py [--methods=none,lora,rslora,...]
        [--steps=120] [--pretrain_steps=300] [--rank=8] [--lr=1e-2]
        [--full_lr=3e-3] [--task=add2] [--pretrain_task=sub2]

The base is the tiny preset (byte tokenizer), first fully fine-tuned for
`--pretrain_steps` on another synthetic task so adapters start from a
model that already reads digits (a random base makes every adapter look
alike). Each method then trains `--steps` on `--task` with the same data,
seed, schedule and (for LoRA-family methods) rank; the table reports eval
loss on held-out rows, exact-match accuracy of greedy answers, trainable
parameter count and wall time (including compilation). Methods not
registered in this checkout are skipped with a note. Default run: a few
minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from tunejax import config as config_lib, peft, train
from tunejax.peft import base as peft_base
from tunejax.train import config as tcfg

DEFAULT = ("none,lora,rslora,dora,pissa,olora,vera,eva,corda,kasa,nlora,"
           "slora,sparse,prompt,prefix,dept,ia3")
# Per-method PeftConfig extras that make budgets comparable.
EXTRAS = {"vera": {"rank": 64}, "corda": {"corda_mode": "ipm"},
          "sparse": {"sparse_match_rank": -1}, "prompt": {}}


def _config(args, task: str, steps: int, model: str, peft_cfg: dict,
            lr: float) -> tcfg.Config:
  d = {
      "total_steps": steps, "seed": 0,
      "model": {"name": model, "tokenizer": "byte",
                "overrides": ({"vocab_size": 259} if model == "tiny"
                              else {})},
      "data": {"source": "synthetic", "format": "prompt_completion",
               "synthetic_task": task, "seq_len": 32, "batch_size": 16},
      "peft": peft_cfg,
      "optim": {"lr": lr, "warmup_steps": 10},
      "eval": {"every": 0, "batches": 4, "generate_examples": args.examples,
               "max_new_tokens": 6,
               "data": {"format": "prompt_answer", "synthetic_seed": 12345}},
      "log": {"every": max(1, steps // 4), "progress": False,
              "tensorboard": False},
      "checkpoint": {"async_save": False},
      "mesh": {"data": 1},
  }
  return config_lib.build(tcfg.Config, d, "")


def _final_eval(workdir: str) -> dict:
  rows = [json.loads(l) for l in open(os.path.join(workdir,
                                                   "metrics.jsonl"))]
  return [r for r in rows if "eval/loss" in r][-1]


def _pretrain(args, root: str) -> str:
  wd = os.path.join(root, "pretrain")
  cfg = _config(args, args.pretrain_task, args.pretrain_steps, "tiny",
                {"method": "none"}, args.full_lr)
  cfg = config_lib.build(tcfg.Config, {
      **json.loads(json.dumps(_asdict(cfg))),
      "checkpoint": {"export_at_end": True, "async_save": False},
      "eval": {"every": -1}}, "")
  out = train.run(cfg, wd)
  return out["export"]


def _asdict(cfg):
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.asdict(cfg)


def _peft_cfg(args, name: str) -> dict:
  if name == "none":
    return {"method": "none"}
  kw = {"method": name, "rank": args.rank, "alpha": 2.0 * args.rank,
        "calib_batches": 4}
  kw.update(EXTRAS.get(name, {}))
  if kw.get("sparse_match_rank") == -1:
    kw["sparse_match_rank"] = args.rank
  fields = {f for f in peft.PeftConfig.__dataclass_fields__}
  return {k: v for k, v in kw.items() if k in fields}


def _count(tree_) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree_)))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default=DEFAULT)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--pretrain_steps", type=int, default=300)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--lr", type=float, default=1e-2)
  p.add_argument("--full_lr", type=float, default=3e-3)
  p.add_argument("--task", default="add2")
  p.add_argument("--pretrain_task", default="sub2")
  p.add_argument("--examples", type=int, default=32)
  p.add_argument("--workdir", default="")
  args = p.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="peft_compare_")
  t0 = time.perf_counter()
  model = _pretrain(args, root) if args.pretrain_steps else "tiny"
  print(f"base: {model} ({time.perf_counter() - t0:.0f} s)")
  rows, skipped = [], []
  for name in args.methods.split(","):
    if name not in peft_base._REGISTRY:  # pylint: disable=protected-access
      skipped.append(name)
      continue
    wd = os.path.join(root, name)
    lr = args.full_lr if name == "none" else args.lr
    cfg = _config(args, args.task, args.steps, model, _peft_cfg(args, name),
                  lr)
    t = time.perf_counter()
    out = train.run(cfg, wd)
    dt = time.perf_counter() - t
    ev = _final_eval(wd)
    rows.append((name, _count(out["state"].params), ev["eval/loss"],
                 ev.get("eval/accuracy", float("nan")),
                 out["metrics"].get("loss", float("nan")), dt))
    print(f"{name}: eval loss {ev['eval/loss']:.4f} ({dt:.0f} s)",
          flush=True)
  print(f"\n{args.task}, {args.steps} steps, batch 16 x 32 tokens, rank "
        f"{args.rank} (VeRA 64), lr {args.lr} (full FT {args.full_lr}), "
        f"base pretrained {args.pretrain_steps} steps on "
        f"{args.pretrain_task}\n")
  print("| method | trainable params | train loss | eval loss | eval acc |"
        " time (s) |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, n, ev_loss, acc, tr_loss, dt in rows:
    print(f"| {name} | {n:,} | {tr_loss:.4f} | {ev_loss:.4f} | {acc:.3f} "
          f"| {dt:.0f} |")
  if skipped:
    print(f"\nnot registered here (skipped): {', '.join(skipped)}")


if __name__ == "__main__":
  main()
