"""LoFiT (Yin et al. 2024): head selection, then head-bias tuning, one run.

  python -m tunejax.main --config=configs/lofit.py --workdir=/tmp/lofit
  python -m tunejax.main --config=configs/lofit.py:model=/path/to/hf,k=32 \
      --workdir=/tmp/lofit

Phase 1 trains the head scales (1 + A) with the L1 penalty for
`phase1_steps` in WORKDIR/lofit_phase1; the top-k heads by ||A_h|| get
biases v trained from the base model for `steps` in WORKDIR (the final
model keeps only v; `task=export` writes it as a tunejax adapter next to
the base). Paper: K ~ 3% of heads (32 for Llama-2-7B), L1 5e-4, lr 5e-3
(phase 1) / 1e-2 (phase 2; one `optim.lr` here serves both).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  a = common.parse_arg(arg, model="tiny", steps=20, phase1_steps=20, k=0)
  c = common.base()
  c.total_steps = a.steps
  c.model.name = a.model
  if a.model == "tiny":
    c.model.tokenizer = "byte"
    c.model.overrides = {"vocab_size": 259, "bos_id": 1, "eos_id": 2,
                         "pad_id": 0}
  c.data.synthetic_task = "add2"
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.peft = dict(method="lofit", lofit_phase1_steps=a.phase1_steps,
                lofit_top_k=a.k, lofit_init_std=1e-3, lofit_l1=5e-4)
  c.optim.lr = 5e-3
  c.optim.warmup_steps = 2
  c.optim.clip_norm = 1.0
  c.log.every = 5
  c.log.progress = False
  return c
