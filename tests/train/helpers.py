"""Shared builders for trainer tests: tiny config + random batches."""
import dataclasses

import numpy as np

from tunejax import config as config_lib
from tunejax.train import config as tcfg

TINY_MODEL = {"name": "tiny", "tokenizer": "byte",
              "overrides": {"vocab_size": 259}}


def tiny_config(**sections) -> tcfg.Config:
  d = {"total_steps": 4, "model": TINY_MODEL,
       "data": {"source": "synthetic", "format": "prompt_completion",
                "synthetic_task": "add2", "seq_len": 16,
                "batch_size": 8},
       "optim": {"lr": 1e-2, "warmup_steps": 0},
       "log": {"every": 1, "progress": False, "tensorboard": False}}
  for k, v in sections.items():
    d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
  return config_lib.build(tcfg.Config, d, "")


def random_batch(seed=0, b=8, l=16, vocab=259):
  """A packed-looking LM batch with padding and a varying loss mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (b, l)).astype(np.int32)
  targets = rng.integers(3, vocab, (b, l)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[:, l // 2:] = 2
  seg[::3, -3:] = 0  # padding tail in some rows
  pos = np.concatenate([np.arange(l // 2), np.arange(l - l // 2)])
  pos = np.broadcast_to(pos, (b, l)).astype(np.int32)
  mask = (rng.random((b, l)) < 0.6).astype(np.float32) * (seg > 0)
  return {"tokens": tokens, "targets": targets, "loss_mask": mask,
          "segment_ids": seg, "positions": pos.copy()}


def replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)


def multihost_config() -> tcfg.Config:
  """The config both the 2-process run and its 1-process reference use."""
  return tiny_config(total_steps=3, mesh={"data": 2},
                     checkpoint={"async_save": False},
                     eval={"every": -1})
