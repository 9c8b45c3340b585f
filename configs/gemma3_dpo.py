"""DPO (LoRA) on the real Gemma 3 270M: correct vs corrupted sums.

Preference pairs come from `tunejax.data.synthetic` (prompt '12+34=',
chosen '46', rejected the answer with one digit changed). The reference is
the frozen base (LoRA off) computed in the same step, or precomputed once
(`ref=precomputed`, which also allows `peft=none`, full fine-tuning).
Metrics: rewards/{chosen,rejected,margin,accuracy}, logps/*, kl, and their
eval/ versions on held-out pairs.

  python -m tunejax.main --config=configs/gemma3_dpo.py --workdir=/tmp/g3dpo
  python -m tunejax.main --config=configs/gemma3_dpo.py:loss=simpo,steps=100 \
      --workdir=/tmp/g3simpo

Arguments: steps, task (synthetic task), loss (sigmoid | hinge | ipo |
robust | simpo | orpo | tdpo), beta, ref (online | precomputed), peft
(lora | none), smoke (2 steps).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top

# Recipe defaults per loss: (name, options); beta is set from the argument.
_LOSSES = {"simpo": ("simpo", {"gamma": 0.5}), "orpo": ("orpo", {}),
           "tdpo": ("tdpo", {"alpha": 0.5, "variant": 2})}


def get_config(arg=None):
  a = common.parse_arg(arg, steps=60, task="add2", loss="sigmoid", beta=0.1,
                       ref="online", peft="lora", smoke=False)
  c = common.base()
  c.task = "dpo"
  c.total_steps = 2 if a.smoke else a.steps
  c.model.name = "gemma3-270m"
  c.data.source = "synthetic"
  c.data.synthetic_task = a.task
  c.data.synthetic_size = 2048
  c.data.format = "preference"
  c.data.seq_len = 64
  c.data.batch_size = 4
  name, options = _LOSSES.get(a.loss, ("dpo", {"loss_type": a.loss}))
  beta = 2.0 if a.loss == "simpo" and a.beta == 0.1 else a.beta
  c.loss = dict(name=name, options={**options, "beta": beta},
                reference=a.ref)
  c.peft = (dict(method="lora", rank=8, alpha=16.0,
                 targets=(r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))",))
            if a.peft == "lora" else dict(method=a.peft))
  c.optim.lr = 5e-4 if a.peft == "lora" else 5e-6
  c.optim.warmup_steps = 5
  c.optim.schedule = "cosine"
  c.eval.every = 20
  c.eval.batches = 2
  c.eval.data = dict(synthetic_seed=1234, synthetic_size=64, shuffle=False)
  c.log.every = 1 if a.smoke else 5
  return c
