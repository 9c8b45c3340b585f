"""DPO train-step benchmark: tunejax vs TRL's DPOTrainer (torch), one CPU.

Same small Llama (vocab 8192, d 256, 4 layers, 4 heads / 2 KV heads, MLP
768), LoRA r=16 on q,k,v,o,gate,up,down, sigmoid DPO β=0.1 with the
online reference (LoRA off), AdamW, float32; B pairs of a P-token prompt
and C-token chosen / rejected completions (no packing: every row holds one
pair, padded alike). Tokens/s counts the processed (non-padding) tokens of
both sides. Each contender runs in its own subprocess.

  python bench/dpo.py [--steps=5] [--batch=8] [--prompt=32] [--completion=32]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODEL = dict(family="llama", vocab_size=8192, d_model=256, n_layers=4,
             n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=768,
             rope_theta=10000.0, tie_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")


def _pairs(a, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  v = MODEL["vocab_size"]
  return [(rng.integers(3, v, a.prompt), rng.integers(3, v, a.completion),
           rng.integers(3, v, a.completion)) for _ in range(a.batch)]


def _side(pairs, which, seq):
  """One row per pair: prompt + response, shifted targets, response mask."""
  import numpy as np
  b = len(pairs)
  out = {k: np.zeros((b, seq), np.int32) for k in ("tokens", "targets",
                                                   "segment_ids",
                                                   "positions")}
  out["loss_mask"] = np.zeros((b, seq), np.float32)
  for i, (p, c, r) in enumerate(pairs):
    ids = np.concatenate([p, c if which == "chosen" else r])
    n = len(ids) - 1
    out["tokens"][i, :n], out["targets"][i, :n] = ids[:-1], ids[1:]
    out["loss_mask"][i, len(p) - 1:n] = 1.0
    out["segment_ids"][i, :n] = 1
    out["positions"][i, :n] = np.arange(n)
  return {f"{which}_{k}": v for k, v in out.items()}


def run_tunejax(a):
  import jax
  from tunejax import config as config_lib, data
  from tunejax.train import config as tcfg, setup
  seq = a.prompt + a.completion - 1
  cfg = config_lib.build(tcfg.Config, dict(
      task="dpo", total_steps=1000, model=dict(name="tiny", overrides=MODEL),
      peft=dict(method="lora", rank=16, alpha=32.0),
      optim=dict(name="adamw", lr=1e-4), mesh=dict(data=1),
      loss=dict(name="dpo", options={"beta": 0.1}),
      data=dict(source="synthetic", format="preference", seq_len=seq,
                batch_size=a.batch)), "")
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  step = setup.jit_train_step(run, 1)
  pairs = _pairs(a)
  batch = {**_side(pairs, "chosen", seq), **_side(pairs, "rejected", seq)}
  g = data.to_global(batch, run.mesh, run.batch_sharding)
  key = jax.random.PRNGKey(0)
  t = time.perf_counter()
  state, m = step(state, g, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(a.steps):
    t = time.perf_counter()
    state, m = step(state, g, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  ntok = 2 * a.batch * seq
  return {"tokens_per_sec": ntok / min(times), "step_s": min(times),
          "compile_s": compile_s, "loss": float(m["loss"])}


def _hf_tokenizer(tmp):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {f"t{i}": i for i in range(MODEL["vocab_size"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  path = os.path.join(tmp, "tokenizer.json")
  tok.save(path)
  return PreTrainedTokenizerFast(tokenizer_file=path, pad_token="t0",
                                 eos_token="t2", bos_token="t1",
                                 unk_token="t0")


def run_trl(a):
  import datasets
  import peft
  import torch
  import transformers
  from transformers import TrainerCallback
  from trl import DPOConfig, DPOTrainer
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(
      vocab_size=MODEL["vocab_size"], hidden_size=MODEL["d_model"],
      intermediate_size=MODEL["mlp_dim"], num_hidden_layers=MODEL["n_layers"],
      num_attention_heads=MODEL["n_heads"],
      num_key_value_heads=MODEL["n_kv_heads"], head_dim=MODEL["head_dim"],
      rope_theta=MODEL["rope_theta"], tie_word_embeddings=False,
      max_position_embeddings=1024)
  model = transformers.LlamaForCausalLM(hf)
  text = lambda ids: " ".join(f"t{int(i)}" for i in ids)
  # The last response token plays EOS (TRL appends none if it ends so).
  rows = [{"prompt": text(p), "chosen": " " + text(c[:-1]) + " t2",
           "rejected": " " + text(r[:-1]) + " t2"} for p, c, r in _pairs(a)]
  n_steps = a.steps + 1
  ds = datasets.Dataset.from_list(rows * n_steps)
  times = []

  class Timer(TrainerCallback):
    def on_step_begin(self, *args, **kw):
      self.t = time.perf_counter()

    def on_step_end(self, *args, **kw):
      times.append(time.perf_counter() - self.t)

  with tempfile.TemporaryDirectory() as tmp:
    args = DPOConfig(output_dir=tmp, per_device_train_batch_size=a.batch,
                     max_steps=n_steps, learning_rate=1e-4, beta=0.1,
                     logging_steps=10**6, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, max_length=None)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=ds,
        processing_class=_hf_tokenizer(tmp),
        peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                    target_modules=list(TARGETS)),
        callbacks=[Timer()])
    trainer.train()
  seq = a.prompt + a.completion - 1
  ntok = 2 * a.batch * seq  # the same token count as tunejax's rows
  return {"tokens_per_sec": ntok / min(times[1:]), "step_s": min(times[1:]),
          "compile_s": times[0]}


CONTENDERS = {"tunejax": run_tunejax, "trl": run_trl}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--completion", type=int, default=32)
  p.add_argument("--only", default="")
  a = p.parse_args()
  if a.only:
    print(json.dumps(CONTENDERS[a.only](a)))
    return
  res = {}
  for name in CONTENDERS:
    out = subprocess.run(
        [sys.executable, __file__, f"--only={name}", f"--steps={a.steps}",
         f"--batch={a.batch}", f"--prompt={a.prompt}",
         f"--completion={a.completion}"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
      print(f"{name}: failed\n{out.stderr[-3000:]}")
      continue
    res[name] = json.loads(lines[-1])
  print(f"\nDPO step (LoRA r16, online reference), {a.batch} pairs x "
        f"({a.prompt} prompt + {a.completion} completion) tokens")
  print(f"{'':10}{'tokens/s':>10}{'step s':>9}{'first s':>9}")
  for name, r in res.items():
    print(f"{name:10}{r['tokens_per_sec']:10.0f}{r['step_s']:9.3f}"
          f"{r['compile_s']:9.1f}")
  if len(res) == 2:
    print(f"tunejax / trl: "
          f"{res['tunejax']['tokens_per_sec'] / res['trl']['tokens_per_sec']:.2f}x"
          " tokens/s")


if __name__ == "__main__":
  main()
