"""DPO on a tiny random model: correct vs corrupted 2-digit sums (CPU, ~1 min).

  python -m tunejax.main --config=configs/tiny_dpo.py --workdir=/tmp/tiny_dpo
  python -m tunejax.main --config=configs/tiny_dpo.py:loss=ipo,ref=precomputed \
      --workdir=/tmp/tiny_ipo

  python -m tunejax.main --config=configs/tiny_dpo.py:loss=treg \
      --workdir=/tmp/tiny_treg    # T-REG: contrastive-prompt token rewards

  python -m tunejax.main --config=configs/tiny_dpo.py:task=reward \
      --workdir=/tmp/tiny_rm      # Bradley-Terry reward model instead

Arguments: task (dpo | reward), steps, loss (a `dpo` loss_type: sigmoid | hinge | ipo | robust, or
another preference loss: simpo | orpo | tdpo | treg), ref (online | precomputed),
peft (lora | none; 'none' = full fine-tuning, needs ref=precomputed).
Metrics: rewards/{chosen,rejected,margin,accuracy}, logps/*, kl in
metrics.jsonl, and the same with an eval/ prefix on held-out pairs.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  a = common.parse_arg(arg, task="dpo", steps=40, loss="sigmoid",
                       ref="online", peft="lora", beta=0.1)
  c = common.base()
  c.task = a.task
  c.total_steps = a.steps
  c.model.name = "tiny"
  c.model.tokenizer = "byte"
  c.model.overrides = {"vocab_size": 259, "bos_id": 1, "eos_id": 2,
                       "pad_id": 0}
  c.data.source = "synthetic"
  c.data.format = "preference"
  c.data.synthetic_task = "add2"
  c.data.synthetic_size = 256
  c.data.seq_len = 48
  c.data.batch_size = 8
  if a.loss in ("simpo", "orpo", "tdpo", "treg"):
    c.loss = dict(name=a.loss, options={"beta": {"simpo": 2.0}.get(
        a.loss, a.beta)}, reference=a.ref)
  else:
    c.loss = dict(name="dpo", options={"beta": a.beta, "loss_type": a.loss},
                  reference=a.ref)
  c.peft = (dict(method="lora", rank=8, alpha=16.0) if a.peft == "lora"
            else dict(method=a.peft))
  c.optim.lr = 1e-2 if a.peft == "lora" else 3e-3
  c.optim.warmup_steps = 2
  c.eval.every = 20
  c.eval.batches = 2
  c.eval.data = dict(synthetic_seed=1234, synthetic_size=64, shuffle=False)
  c.log.every = 5
  c.log.progress = False
  c.log.tensorboard = False
  return c
