"""Forward and greedy-decode throughput: tunejax vs transformers (CPU, f32).

Same weights on both sides (the random HF model is saved and loaded by
tunejax). Prints tokens/s and the tunejax / transformers ratios, and two
decode ceilings: the machine's read bandwidth over the weights and KV, and
the time of one step's weight products alone (the model's own matrices at
the decode batch, in JAX and in torch), which bounds any decoder here.

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


def _layer_weights(hf):
  """Per layer, the HF model's (q, k, v, o, gate, up, down) weights, torch
  `[out, in]` tensors; and the lm_head's."""
  layers = [(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
             a.o_proj.weight, m.gate_proj.weight, m.up_proj.weight,
             m.down_proj.weight)
            for a, m in ((l.self_attn, l.mlp) for l in hf.model.layers)]
  return layers, hf.lm_head.weight


def _chain(h, layers, head, mm, silu, rowsum):
  """One decode step's products only: each layer's seven batch-B products
  in order (the query stands in for the attention output, and the keys
  and values enter through a small row sum so none is dead code), then the
  head. Each product's input depends on the previous ones, as in the
  model."""
  for q, k, v, o, g, u, d in layers:
    kv = rowsum(mm(h, k) * mm(h, v))
    h = h + mm(mm(h, q), o) + 1e-6 * kv
    h = h + mm(silu(mm(h, g)) * mm(h, u), d)
  return mm(h, head)


def matmul_chain_seconds(hf, rows: int, repeats: int) -> dict:
  """Seconds of one decode step's weight products alone (no attention,
  norms or sampling) at batch `rows`, over the model's own weights: in JAX
  (XLA:CPU kernels) and in torch. No decoder on this machine steps faster
  than the faster of the two, so transformers' step time over it bounds
  any decoder's ratio."""
  layers, head = _layer_weights(hf)
  x = np.random.RandomState(1).randn(rows, head.shape[1]).astype(np.float32)
  with torch.no_grad():
    t_layers = [tuple(w.detach() for w in l) for l in layers]
    tx, th = torch.from_numpy(x), head.detach()
    t_step = lambda: _chain(tx, t_layers, th, lambda a, w: a @ w.T,
                            torch.nn.functional.silu,
                            lambda t: t.sum(-1, keepdim=True))
    secs_torch = best_of(t_step, max(repeats, 5), warmup=True)
  j_layers = [tuple(jnp.asarray(w.detach().numpy().T) for w in l)
              for l in layers]
  jh = jnp.asarray(head.detach().numpy().T)
  run = jax.jit(lambda x, ls, hd: _chain(
      x, ls, hd, jnp.matmul, jax.nn.silu,
      lambda t: jnp.sum(t, -1, keepdims=True)))
  jx = jnp.asarray(x)
  secs_jax = best_of(lambda: run(jx, j_layers, jh).block_until_ready(),
                     max(repeats, 5), warmup=True)
  return {"jax": secs_jax, "torch": secs_torch}


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
  bw = read_bandwidth(args.repeats)
  floor = decode_floor(cfg, args.batch, args.num_samples, args.prompt,
                       args.new, bw)
  print(f"decode   ceiling at this machine's read bandwidth ({bw / 1e9:.1f} "
        f"GB/s; f32 weights + KV): {n / floor:10.1f} tokens/s = "
        f"{t_hf / floor:.2f}x transformers")
  chain = matmul_chain_seconds(hf, rows, args.repeats)
  best = min(chain.values())
  print(f"decode   one step's weight products alone, batch {rows}: JAX "
        f"{chain['jax'] * 1e3:.1f} ms, torch {chain['torch'] * 1e3:.1f} ms "
        f"(transformers' step: {t_hf / args.new * 1e3:.1f} ms, tunejax's: "
        f"{t_jax / args.new * 1e3:.1f} ms)")
  print(f"decode   ceiling at those products' speed (no attention, norms, "
        f"sampling or prefill): {rows / best:10.1f} tokens/s = "
        f"{t_hf / (args.new * best):.2f}x transformers")


if __name__ == "__main__":
  main()
