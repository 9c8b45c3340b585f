"""Qwen 2.5 / Qwen 3 full fine-tuning on a TPU pod slice, pure FSDP.

  --config=configs/qwen_tpu.py --config.model.name=/data/Qwen2.5-0.5B

Sized with task=compile (README): on 8 chips the 0.5B model's step holds
8.3 GiB per device compiled for CPU (bf16 products run through float32
there: TPU needs less); with one micro-batch it held 29.4 GiB.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  del arg
  c = common.base()
  c.total_steps = 3000
  c.model.name = "qwen2.5-0.5b"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.source = "jsonl"
  c.data.path = "/data/chat.jsonl"
  c.data.format = "chat"
  c.data.chat_style = "chatml"
  c.data.seq_len = 4096
  c.data.batch_size = 128
  c.micro_batches = 4
  c.compile_cache = "~/.cache/tunejax/xla"  # on each worker
  c.peft = dict(method="none")
  c.optim = dict(name="adamw", lr=1e-5, warmup_steps=100, weight_decay=0.1,
                 schedule="cosine", min_lr_ratio=0.1)
  c.mesh = dict(data=1, fsdp=-1, tensor=1, rules={})
  c.checkpoint = dict(every=250, keep=2)
  c.eval = dict(every=250, batches=16, data={"split": "validation"})
  c.log = dict(every=10, peak_tflops=197.0)
  return c
