"""Llama 3 8B LoRA SFT on a TPU pod slice (e.g. v5e-32), FSDP.

  launch/tpu_vm.sh run NAME ZONE -- --config=configs/llama3_8b_tpu.py \
      --config.model.name=/data/Meta-Llama-3-8B --config.data.path=/data/sft.jsonl \
      --workdir=/data/runs/llama3_8b_lora

`arg` 'full' switches to full fine-tuning (bf16 params, AdamW).

Sized with task=compile (README) on 32 fake CPU devices: 7.5 GiB per
device for LoRA, 10.0 GiB for full fine-tuning (CPU compiles bf16 products
through float32: TPU needs less), under a v5e chip's 16 GiB; the earlier
FSDP 4 x TP 8, save_dots, 4 micro-batches needed 180 GiB.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  a = common.parse_arg(arg, full=False)
  c = common.base()
  c.total_steps = 2000
  c.model.name = "llama3-8b"  # replace with the HF checkpoint directory
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16" if a.full else "float32"
  c.model.remat = "full"
  c.data.source = "jsonl"
  c.data.path = "/data/sft.jsonl"
  c.data.format = "chat"
  c.data.seq_len = 4096
  c.data.batch_size = 256
  c.micro_batches = 8  # one 4096-token row per chip per micro-batch
  c.compile_cache = "~/.cache/tunejax/xla"  # on each worker
  if a.full:
    c.peft = dict(method="none")
    c.optim = dict(name="adamw", lr=1e-5, warmup_steps=100, weight_decay=0.1)
  else:
    c.peft = dict(method="lora", rank=16, alpha=32.0)
    c.optim = dict(name="adamw", lr=2e-4, warmup_steps=100)
  # FSDP over every chip: with 8-way TP each chip ran 4x the rows (the TP
  # group shares them), 51-180 GiB per device (see the docstring).
  c.mesh = dict(data=1, fsdp=-1, tensor=1, rules={})
  c.checkpoint = dict(every=200, keep=3, resume=True, async_save=True)
  c.eval = dict(every=200, batches=16, data={"split": "validation"})
  c.log = dict(every=10, peak_tflops=197.0)  # v5e bf16 peak per chip
  return c
