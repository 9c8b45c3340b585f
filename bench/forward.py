"""Forward and greedy-decode throughput: tunejax vs transformers (CPU, f32).

Same weights on both sides (the random HF model is saved and loaded by
tunejax). Prints tokens/s and the tunejax / transformers ratios.

  python bench/forward.py [--d 512 --layers 8 --batch 8 --prompt 64 --new 128]
                          [--num_samples 4 --prompt 512]   # GRPO-style groups
"""
from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from tunejax import models
from timing import best_of  # bench/timing.py


def read_bandwidth(repeats: int, n_bytes: int = 1 << 30) -> float:
  """Bytes/s of one streaming read (a sum over an array larger than the
  caches): the rate a weight-bound decode step can reach at best."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  secs = best_of(lambda: total(x).block_until_ready(), max(repeats, 5),
                 warmup=True)
  return n_bytes / secs


def matmul_stream_rate(batch: int, d: int, n: int, repeats: int,
                       n_bytes: int = 512 << 20) -> float:
  """Weight bytes/s of `[batch, d] @ [d, n]` products over distinct
  weights (more than the caches hold), as in a decode step: what this
  backend's matmul kernels reach at this batch."""
  count = max(1, n_bytes // (4 * d * n))
  ws = [jax.random.normal(jax.random.PRNGKey(i), (d, n)) for i in range(count)]
  x = jnp.ones((batch, d), jnp.float32)
  run = jax.jit(lambda x, ws: sum(x @ w for w in ws))
  secs = best_of(lambda: run(x, ws).block_until_ready(), max(repeats, 5),
                 warmup=True)
  return count * 4 * d * n / secs


def decode_floor(cfg, prompts: int, samples: int, prompt: int, new: int,
                 bw: float) -> float:
  """Seconds of `new` decode steps if each read only what it must: every
  f32 weight but the input embedding table (a few rows are gathered), and
  the K/V of the tokens so far (each prompt's once, however many samples
  share it). Prefill is left out: a lower bound."""
  weights = cfg.n_params() - (0 if cfg.tie_embeddings else
                              cfg.vocab_size * cfg.d_model)
  kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
  kv_tokens = prompts * (prompt + samples * (new + 1) / 2)  # mean per step
  return new * 4 * (weights + kv_per_token * kv_tokens) / bw


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv_heads", type=int, default=8)
  ap.add_argument("--mlp", type=int, default=1408)
  ap.add_argument("--vocab", type=int, default=32_000)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--forward_len", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--num_samples", type=int, default=1,
                  help="completions per prompt (GRPO-style groups): tunejax "
                  "prefills each prompt once, transformers' "
                  "num_return_sequences repeats it before prefill")
  args = ap.parse_args()

  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.mlp,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
      pad_token_id=0)
  hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    cfg, params = models.load(d)
  print(f"llama d={args.d} layers={args.layers} params={cfg.n_params():,} "
        f"batch={args.batch} torch_threads={torch.get_num_threads()} "
        f"jax={jax.devices()[0].platform}")

  rs = np.random.RandomState(0)
  fwd_tokens = rs.randint(3, args.vocab, (args.batch, args.forward_len))
  prompts = rs.randint(3, args.vocab, (args.batch, args.prompt))

  # Forward.
  fwd = jax.jit(models.forward, static_argnums=0)
  x = jnp.asarray(fwd_tokens)
  fwd(cfg, params, x).block_until_ready()
  t_jax = best_of(lambda: fwd(cfg, params, x).block_until_ready(),
                   args.repeats)
  xt = torch.tensor(fwd_tokens)
  with torch.no_grad():
    hf(xt)
    t_hf = best_of(lambda: hf(xt), args.repeats)
  n = fwd_tokens.size
  print(f"forward  tokens/s: tunejax {n / t_jax:10.1f}   transformers "
        f"{n / t_hf:10.1f}   ratio {t_hf / t_jax:.2f}x")

  # Decode, prefill included; every row runs all new tokens. Greedy, or
  # sampled groups with --num_samples.
  plist = [list(p) for p in prompts]
  # Groups are sampled (transformers has no greedy num_return_sequences);
  # top-k 50 is transformers' sampling default.
  sample = args.num_samples > 1
  gen = lambda: models.generate(
      cfg, params, plist, args.new, temperature=1.0 if sample else 0.0,
      top_k=50 if sample else None, eos_id=-1,
      num_samples=args.num_samples).tokens_BxT.block_until_ready()
  gen()
  t_jax = best_of(gen, args.repeats)
  pt = torch.tensor(prompts)
  with torch.no_grad():
    hf_gen = lambda: hf.generate(pt, attention_mask=torch.ones_like(pt),
                                 max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=sample,
                                 **({"top_k": 50} if sample else {}),
                                 num_return_sequences=args.num_samples,
                                 pad_token_id=0)
    hf_gen()
    t_hf = best_of(hf_gen, args.repeats)
  n = args.batch * args.num_samples * args.new
  print(f"decode   tokens/s: tunejax {n / t_jax:10.1f}   transformers "
        f"{n / t_hf:10.1f}   ratio {t_hf / t_jax:.2f}x")
  rows = args.batch * args.num_samples
  for what, rate in (
      ("read bandwidth", read_bandwidth(args.repeats)),
      (f"batch-{rows} matmul weight stream",
       matmul_stream_rate(rows, args.d, args.mlp, args.repeats))):
    floor = decode_floor(cfg, args.batch, args.num_samples, args.prompt,
                         args.new, rate)
    print(f"decode   ceiling at this machine's {what} ({rate / 1e9:.1f} "
          f"GB/s; f32 weights + KV): {n / floor:10.1f} tokens/s = "
          f"{t_hf / floor:.2f}x transformers")


if __name__ == "__main__":
  main()
