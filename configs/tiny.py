"""Tiny random Llama-style model on a synthetic task: tests and smoke runs.

  python -m tunejax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  a = common.parse_arg(arg, steps=20)
  c = common.base()
  c.total_steps = a.steps
  c.model.name = "tiny"
  c.model.tokenizer = "byte"
  c.model.overrides = {"vocab_size": 259, "bos_id": 1, "eos_id": 2,
                       "pad_id": 0}
  c.data.synthetic_task = "add2"
  c.data.format = "prompt_completion"
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.log.every = 5
  c.log.progress = False
  return c
