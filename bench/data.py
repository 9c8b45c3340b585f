"""Input-pipeline throughput: tokens/s of tokenize + pack + batch.

    python bench/data.py [--tokenizer=gemma3-270m|byte] [--rows=4000]
                         [--seq_len=1024] [--batch_size=8]

Writes a synthetic corpus (JSONL) of text, prompt/completion and chat rows
with varied lengths, runs one epoch of `tunejax.data.make_iterator` per format
and prints served (non-padding) tokens per second and packing efficiency.
The pipeline must stay >= 10x faster than the CPU train step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from tunejax import data
from tunejax import tokenizers
from tunejax.tokenizers import byte

WORDS = ("the model learns to add numbers and reverse words while the data "
         "pipeline packs documents into rows of fixed length so that no "
         "token is lost").split()


def _sentence(rng: random.Random, n_words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize()


def write_corpus(directory: str, rows: int, seed: int = 0) -> dict[str, str]:
  """One JSONL file per format; lengths ~ 10..400 words."""
  rng = random.Random(seed)
  paths = {}
  for fmt in ("text", "prompt_completion", "chat"):
    path = os.path.join(directory, f"{fmt}.jsonl")
    with open(path, "w") as f:
      for _ in range(rows):
        a = _sentence(rng, rng.randint(5, 200))
        b = _sentence(rng, rng.randint(5, 200))
        row = {"text": {"text": a + " " + b},
               "prompt_completion": {"prompt": a, "completion": b},
               "chat": {"messages": [{"role": "user", "content": a},
                                     {"role": "assistant", "content": b}]}
               }[fmt]
        f.write(json.dumps(row) + "\n")
    paths[fmt] = path
  return paths


def bench(cfg: data.DataConfig, tok) -> dict[str, float]:
  it = data.make_iterator(cfg, tok, seed=0)
  start = time.perf_counter()
  batches = sum(1 for _ in it)
  seconds = time.perf_counter() - start
  stats = it.stats()
  return {"batches": batches, "tokens": stats["tokens"], "seconds": seconds,
          "tokens_per_sec": stats["tokens"] / seconds,
          "packing_efficiency": stats["packing_efficiency"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokenizer", default="gemma3-270m")
  parser.add_argument("--rows", type=int, default=4000)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--train_step", default=True,
                      action=argparse.BooleanOptionalAction,
                      help="also time the W1 LoRA train step and print the "
                      "pipeline / train-step ratio")
  args = parser.parse_args()
  rates = []
  tok = (byte.ByteTokenizer() if args.tokenizer == "byte"
         else tokenizers.load(args.tokenizer))
  with tempfile.TemporaryDirectory() as tmp:
    paths = write_corpus(tmp, args.rows)
    for fmt, path in paths.items():
      for packing in (True, False):
        cfg = data.DataConfig(source="jsonl", path=path, format=fmt,
                              seq_len=args.seq_len, packing=packing,
                              batch_size=args.batch_size, num_epochs=1,
                              truncation="right")
        r = bench(cfg, tok)
        rates.append(r["tokens_per_sec"])
        print(f"{fmt:18s} packing={packing!s:5s} {r['tokens']:>9,d} tokens "
              f"in {r['seconds']:6.2f}s = {r['tokens_per_sec']:>10,.0f} "
              f"tokens/s, packing efficiency {r['packing_efficiency']:.3f}")
  if args.train_step:
    step = _train_step_tokens_per_sec()
    print(f"W1 LoRA train step: {step:,.0f} tokens/s; slowest pipeline / "
          f"train step = {min(rates) / step:,.1f}x (target >= 10x)")


def _train_step_tokens_per_sec() -> float:
  """W1 train-step tokens/s from bench/train_step.py, in a subprocess."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "train_step.py")
  out = subprocess.run([sys.executable, script, "--only=tunejax",
                        "--steps=2"], capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out.strip().splitlines()[-1])["tokens_per_sec"]


if __name__ == "__main__":
  main()
