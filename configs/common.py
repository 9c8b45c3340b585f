"""The full config skeleton with every default; recipes override fields."""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "sft"  # sft | dpo | reward | eval | export | generate | compile
  c.seed = 0
  c.total_steps = 100
  c.micro_batches = 1
  c.compile_cache = ""  # a directory: compiled steps reused across runs
  c.model = dict(name="tiny", tokenizer="", dtype="float32",
                 param_dtype="float32", remat="none", scan_layers=True,
                 overrides={})
  c.data = dict(source="synthetic", path="", format="prompt_completion",
                seq_len=64, batch_size=8, packing=True)
  c.peft = dict(method="none")
  c.loss = dict(name="xent", options={})
  c.optim = dict(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0,
                 weight_decay=0.0, clip_norm=1.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, rules={})
  c.checkpoint = dict(every=0, keep=3, resume=True, async_save=True,
                      export_at_end=False)
  c.eval = dict(every=0, batches=2, data={}, generate_examples=0,
                max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0,
                prompts=(), num_samples=1)
  c.log = dict(every=10, tensorboard=True, progress=True, peak_tflops=0.0)
  return ml_collections.ConfigDict(c)


def parse_arg(arg: str | None, **defaults):
  """'a=1,b=x' -> ConfigDict with typed values (ints/floats/bools kept)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    cur = out.get(key)
    if isinstance(cur, bool):
      out[key] = value.lower() in ("1", "true", "yes", "")
    elif cur is not None:
      out[key] = type(cur)(value)
    else:
      out[key] = value
  return out
