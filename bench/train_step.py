"""W1 train-step benchmark: tunejax vs transformers+peft (torch) on one CPU
or GPU.

Workload W1: Llama architecture, vocab 32000, d=512, 8 layers, 8 heads / 2
KV heads, head_dim 64, MLP 1536, seq 512, batch 8, LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down (or full FT with --method=none), AdamW, float32.

Each contender runs in its own subprocess (so peak RSS is its own) and the
f32 matmul peak is measured in the same run; `--rounds` repeats them all,
interleaved, and keeps each one's fastest round. Prints tokens/s, model
TFLOP/s, % of the matmul peak, peak memory (host RSS on a CPU, allocated
device bytes on a GPU), and the ratios; then where the step's time goes:
its weight products alone (JAX and torch), and tunejax's fused loss and
attention (forward and backward) alone. On a GPU `--precision` sets both
libraries' float32 products alike: 'float32' (full) or 'tf32'
(TensorFloat-32 inputs, as JAX's default there and torch's 'high').

  python bench/train_step.py [--steps=5] [--rounds=2] [--method=lora|none]
"""
import argparse
import json
import resource
import subprocess
import sys

from timing import (  # bench/timing.py
    add_hugepages_flag, best_of, best_round, child_env,
    matmul_peak, step_stats)

W1 = dict(family="llama", vocab_size=32000, d_model=512, n_layers=8,
          n_heads=8, n_kv_heads=2, head_dim=64, mlp_dim=1536,
          rope_theta=500000.0, tie_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")


def _on_gpu() -> bool:
  import jax
  return jax.default_backend() == "gpu"


def _mem_mb(torch_device=None) -> float:
  """Peak memory of this process: allocated GPU bytes, else host RSS."""
  if torch_device == "cuda":
    import torch
    return torch.cuda.max_memory_allocated() / 2**20
  if torch_device is None and _on_gpu():
    import jax
    return jax.local_devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set_precision(a):
  """Both libraries' float32 products at `a.precision` (see the docstring);
  'default' leaves each library's own default."""
  if a.precision == "default":
    return
  import jax
  import torch
  jax.config.update("jax_default_matmul_precision",
                    "tensorfloat32" if a.precision == "tf32" else "float32")
  torch.set_float32_matmul_precision(
      "high" if a.precision == "tf32" else "highest")


def _peak(a):
  _set_precision(a)
  gpu = _on_gpu()
  return {**matmul_peak(8192 if gpu else 2048), "gpu": gpu}


def run_tunejax(a):
  import jax
  import numpy as np
  from tunejax import config as config_lib, data
  from tunejax.train import config as tcfg, setup
  _set_precision(a)
  cfg = config_lib.build(tcfg.Config, dict(
      total_steps=1000, model=dict(name="tiny", overrides=W1,
                                   scan_layers=a.scan_layers == "true",
                                   remat=a.remat),
      peft=(dict(method="lora", rank=16, alpha=32.0) if a.method == "lora"
            else dict(method="none")),
      optim=dict(name="adamw", lr=1e-4), mesh=dict(data=1),
      loss=dict(name="xent", options={"impl": a.loss_impl}),
      data=dict(source="synthetic", seq_len=a.seq, batch_size=a.batch)), "")
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  step = setup.jit_train_step(run, 1)
  rng = np.random.default_rng(0)
  b, l = a.batch, a.seq
  batch = {"tokens": rng.integers(0, 32000, (b, l)).astype(np.int32),
           "targets": rng.integers(0, 32000, (b, l)).astype(np.int32),
           "loss_mask": np.ones((b, l), np.float32),
           "segment_ids": np.ones((b, l), np.int32),
           "positions": np.broadcast_to(np.arange(l, dtype=np.int32),
                                        (b, l)).copy()}
  g = data.to_global(batch, run.mesh, run.batch_sharding)
  key = jax.random.PRNGKey(0)
  box = [state]

  def one_step():
    box[0], m = step(box[0], g, key)
    jax.block_until_ready(m)

  out = step_stats(one_step, a.steps, b * l)
  # 6N-style model FLOPs; with frozen base weights (LoRA) the weight-grad
  # matmuls are not done: 4N (forward 2N + activation grads 2N).
  flops = model_cfg.flops_per_token(l, weight_grads=a.method != "lora")
  return {**out, "tflops": flops * out["tokens_per_sec"] / 1e12,
          "mem_mb": _mem_mb()}


def run_torch(a, compiled: bool):
  import torch
  import transformers
  torch.manual_seed(0)
  torch.set_num_threads(max(1, torch.get_num_threads()))
  _set_precision(a)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  hf = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=512, intermediate_size=1536,
      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
      head_dim=64, rope_theta=500000.0, tie_word_embeddings=False,
      max_position_embeddings=4096)
  model = transformers.LlamaForCausalLM(hf).to(dev)
  if a.method == "lora":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS)))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  ids = torch.randint(0, 32000, (a.batch, a.seq), device=dev)
  fwd = torch.compile(model) if compiled else model

  def step():
    loss = fwd(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # waits for the step (as block_until_ready)

  return {**step_stats(step, a.steps, a.batch * a.seq),
          "mem_mb": _mem_mb(dev)}


def _products(a):
  """(M, K, N) of the step's weight products: every linear layer's forward
  and activation-gradient product, the head's, and with full fine-tuning
  their weight-gradient products (attention, norms and the optimizer
  left out)."""
  t, d, f, v = a.batch * a.seq, W1["d_model"], W1["mlp_dim"], W1["vocab_size"]
  k = W1["head_dim"]
  q, kv = W1["n_heads"] * k, W1["n_kv_heads"] * k
  linears = ([(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)] *
             W1["n_layers"])
  out = []
  for i, o in linears + [(d, v)]:
    out += [(t, i, o), (t, o, i)]  # forward, activation gradient
    if a.method == "none":
      out.append((i, t, o))  # weight gradient
  return out


def run_products(a):
  """Seconds of the step's weight products alone, in JAX and in torch
  (each product independent, so each library schedules them freely): the
  floor of each library's kernels under any step on these shapes."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  _set_precision(a)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if dev == "cuda" else lambda: None
  shapes = _products(a)
  rng = np.random.default_rng(0)
  mats = [(rng.standard_normal((m, k), np.float32),
           rng.standard_normal((k, n), np.float32)) for m, k, n in shapes]
  j = [(jnp.asarray(x), jnp.asarray(w)) for x, w in mats]
  run = jax.jit(lambda ps: [x @ w for x, w in ps])
  secs_jax = best_of(lambda: jax.block_until_ready(run(j)), a.steps,
                     warmup=True)
  t = [(torch.from_numpy(x).to(dev), torch.from_numpy(w).to(dev))
       for x, w in mats]
  secs_torch = best_of(lambda: ([x @ w for x, w in t], sync()), a.steps,
                       warmup=True)
  flops = sum(2 * m * k * n for m, k, n in shapes)
  return {"jax_s": secs_jax, "torch_s": secs_torch, "flops": flops}


def run_parts(a):
  """Seconds of the step's fused loss (value and gradients, as trained) and
  of its attention (forward and backward, all layers), each alone in
  tunejax: with `products`, where a step's time goes."""
  import jax
  import jax.numpy as jnp
  from tunejax import kernels
  from tunejax.models import attend
  _set_precision(a)
  b, l, d, v = a.batch, a.seq, W1["d_model"], W1["vocab_size"]
  h, g, k = W1["n_heads"], W1["n_kv_heads"], W1["head_dim"]
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (b * l, d))
  w = jax.random.normal(keys[1], (d, v)) * d**-0.5
  y = jax.random.randint(keys[2], (b * l,), 0, v)
  wrt = (0,) if a.method == "lora" else (0, 1)  # frozen head under LoRA
  loss = jax.jit(jax.grad(lambda x, w: jnp.sum(
      kernels.token_stats(x, w, y).logp), argnums=wrt))
  secs_loss = best_of(lambda: jax.block_until_ready(loss(x, w)), a.steps,
                      warmup=True)
  q = jax.random.normal(keys[3], (b, g, h // g * l, k))
  kv = [jax.random.normal(kk, (b, g, l, k)) for kk in keys[4:]]
  i = jnp.arange(l)
  mask = jnp.broadcast_to(i[:, None] >= i[None, :], (b, l, l))
  att = lambda q, kk, vv: attend.attend(
      q, kk, vv, mask, scale=k**-0.5,
      causal_block=attend.causal_block(l, b * h))
  fwd_bwd = jax.jit(lambda q, kk, vv: jax.vjp(att, q, kk, vv)[1](q))
  secs_att = best_of(lambda: jax.block_until_ready(fwd_bwd(q, *kv)),
                     a.steps, warmup=True)
  return {"loss_s": secs_loss,
          "loss_flops": 2 * (1 + len(wrt)) * b * l * d * v,
          "attention_s": secs_att * W1["n_layers"]}


CONTENDERS = {"peak": _peak, "products": run_products, "parts": run_parts,
              "tunejax": run_tunejax,
              "torch_eager": lambda a: run_torch(a, False),
              "torch_compile": lambda a: run_torch(a, True)}


def _run_contender(name, a):
  """One contender in its own subprocess -> its result dict, or None."""
  flags = [f"--{k}={getattr(a, k)}" for k in (
      "steps", "batch", "seq", "method", "loss_impl", "scan_layers", "remat",
      "precision")]
  out = subprocess.run([sys.executable, __file__, f"--only={name}", *flags],
                       capture_output=True, text=True, check=False,
                       env=child_env(a.hugepages == "true"))
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    print(f"{name}: failed\n{out.stderr[-2000:]}")
    return None
  return json.loads(lines[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--method", default="lora", choices=["lora", "none"])
  p.add_argument("--rounds", type=int, default=2,
                 help="runs of every contender, interleaved; each reports "
                 "its fastest")
  p.add_argument("--only", default="")
  p.add_argument("--scan_layers", default="true", choices=["true", "false"],
                 help="tunejax model.scan_layers. Unrolled (false) has no "
                 "stacked residual buffers but keeps more live: on a 2-core "
                 "CPU 832-872 tokens/s at 3.8 GB vs 778-801 at 3.0 GB")
  p.add_argument("--remat", default="none",
                 help="tunejax model.remat: none | full | save_dots")
  add_hugepages_flag(p)
  p.add_argument("--precision", default="default",
                 choices=["default", "float32", "tf32"],
                 help="float32 products on a GPU (see the docstring)")
  p.add_argument("--loss_impl", default="auto",
                 help="token_stats impl for tunejax: auto | xla | naive")
  a = p.parse_args()
  if a.only:
    print(json.dumps(CONTENDERS[a.only](a)))
    return
  res = {}
  # Rounds interleave the contenders, so a slow spell of the shared machine
  # hits all of them; each keeps its fastest round (memory: its largest).
  for _ in range(a.rounds):
    for name in CONTENDERS:
      r = _run_contender(name, a)
      if r is not None:
        res[name] = best_round(res.get(name), r)
  _report(res, a)


def _report(res, a):
  """Prints the contenders' table, the ratios and the floors."""
  peak = res.get("peak", {}).get("tflops")
  mem = "GPU MB" if res.get("peak", {}).get("gpu") else "RSS MB"
  print(f"\nW1 ({a.method}, batch {a.batch} x seq {a.seq}); f32 matmul peak "
        f"{peak and peak * 1e3:.1f} GFLOP/s")
  print(f"{'':15}{'tokens/s':>10}{'step ms':>9}{'compile s':>10}"
        f"{'GFLOP/s':>9}{'% peak':>8}{mem:>8}")
  for name in ("tunejax", "torch_eager", "torch_compile"):
    r = res.get(name)
    if r:
      gf = r.get("tflops", res.get("tunejax", {}).get("tflops", 0) *
                 r["tokens_per_sec"] / max(res.get("tunejax", {}).get(
                     "tokens_per_sec", 1), 1e-9)) * 1e3
      pct = 100 * gf / (peak * 1e3) if peak else float("nan")
      print(f"{name:15}{r['tokens_per_sec']:10.0f}{r['step_s'] * 1e3:9.1f}"
            f"{r['compile_s']:10.1f}{gf:9.1f}{pct:8.1f}{r['mem_mb']:8.0f}")
  tj = res.get("tunejax")
  for name in ("torch_eager", "torch_compile"):
    if tj and name in res:
      print(f"tunejax / {name}: {tj['tokens_per_sec'] / res[name]['tokens_per_sec']:.2f}x "
            f"tokens/s, {mem.split()[0]} {tj['mem_mb'] / res[name]['mem_mb']:.2f}x")
  pr = res.get("products")
  if pr:
    tokens = a.batch * a.seq
    print(f"the step's weight products alone ({pr['flops'] / 1e12:.2f} "
          f"TFLOP, no attention/norms/optimizer): JAX {pr['jax_s'] * 1e3:.1f} ms "
          f"({pr['flops'] / pr['jax_s'] / 1e9:.0f} GFLOP/s, <= "
          f"{tokens / pr['jax_s']:.0f} tokens/s), torch {pr['torch_s'] * 1e3:.1f} ms "
          f"({pr['flops'] / pr['torch_s'] / 1e9:.0f} GFLOP/s, <= "
          f"{tokens / pr['torch_s']:.0f} tokens/s)")
  pa = res.get("parts")
  if pa:
    print(f"alone in tunejax: the fused loss {pa['loss_s'] * 1e3:.1f} ms "
          f"({pa['loss_flops'] / pa['loss_s'] / 1e9:.0f} GFLOP/s of its "
          f"products; in the weight products above), attention fwd+bwd "
          f"{pa['attention_s'] * 1e3:.1f} ms ({W1['n_layers']} layers)")


if __name__ == "__main__":
  main()
