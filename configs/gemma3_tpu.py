"""Gemma 3 (from an HF checkpoint dir) LoRA SFT on a TPU pod slice.

  --config=configs/gemma3_tpu.py --config.model.name=/data/gemma-3-1b-pt

Sized with task=compile (README): on 8 chips the 270M model's step holds
5.2 GiB per device compiled for CPU (bf16 products run through float32
there: TPU needs less); before, FSDP 4 x TP 2 with one micro-batch held
22 GiB. Check a bigger model the same way before launching.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  del arg
  c = common.base()
  c.total_steps = 1000
  c.model.name = "gemma3-270m"
  c.model.dtype = "bfloat16"
  c.model.remat = "save_dots"
  c.data.source = "jsonl"
  c.data.path = "/data/chat.jsonl"
  c.data.format = "chat"
  c.data.chat_style = "gemma"
  c.data.seq_len = 2048
  c.data.batch_size = 64
  c.micro_batches = 4
  c.compile_cache = "~/.cache/tunejax/xla"  # on each worker
  c.peft = dict(method="lora", rank=16, alpha=32.0)
  c.optim = dict(name="adamw", lr=3e-4, warmup_steps=50)
  # FSDP over every chip (each chip runs batch / chips rows); Gemma's 262k
  # vocabulary is sharded over both model axes if tensor > 1.
  c.mesh = dict(data=1, fsdp=-1, tensor=1,
                rules={"vocab": ("tensor", "fsdp")})
  c.checkpoint = dict(every=100, keep=3)
  c.eval = dict(every=100, batches=8, data={"split": "validation"})
  c.log = dict(every=10, peak_tflops=197.0)
  return c
