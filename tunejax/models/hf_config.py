"""Hugging Face `config.json` <-> `ModelConfig`, and the tensor-name map.

Accepts both the transformers 4.x (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`) and 5.x (`rope_parameters`, per layer type for
Gemma 3) spellings; writes the 5.x spelling plus `rope_theta`.
"""
from __future__ import annotations

from typing import Any

from tunejax import errors
from tunejax.models.config import ModelConfig

_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
           "gemma2": "gemma2", "gemma3_text": "gemma3"}
_ACT = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_tanh": "gelu_tanh"}
_LAYER_TYPE = {"full_attention": "global", "sliding_attention": "local"}
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
         "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPE = {v: k for k, v in _FAMILY.items()}


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _rope(d: dict, layer_type: str | None, path: str):
  """(theta, scaling or None) for one layer type, from either spelling."""
  params = d.get("rope_parameters")
  if isinstance(params, dict) and layer_type in params:
    params = params[layer_type]
  if params is None:  # transformers 4.x
    params = dict(d.get("rope_scaling") or {})
    theta = d.get("rope_theta", 10_000.0)
    if layer_type == "sliding_attention":
      theta, params = d.get("rope_local_base_freq", theta), {}
    params.setdefault("rope_theta", theta)
  kind = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta", d.get("rope_theta", 10_000.0)))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, {"rope_type": "linear", "factor": float(params["factor"])}
  if kind == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings")
    return theta, {"rope_type": "llama3",
                   **{k: float(params[k]) for k in keys}}
  raise errors.ModelError(f"{path}: unsupported rope type {kind!r} "
                          "(supported: default, linear, llama3)")


def config_from_hf(d: dict, path: str, dtype: str | None = None
                   ) -> ModelConfig:
  """ModelConfig from a parsed config.json (`path` names it in errors)."""
  if d.get("model_type") == "gemma3" and "text_config" in d:
    d = {**d["text_config"], "model_type": "gemma3_text"}
  mt = d.get("model_type")
  if mt not in _FAMILY:
    raise errors.ModelError(
        f"{path}: unsupported model_type {mt!r} (supported: "
        f"{sorted(_FAMILY)} and gemma3 with a text_config)")
  family = _FAMILY[mt]

  def unsupported(key, why):
    raise errors.ModelError(f"{path}: field '{key}'={d.get(key)!r} is "
                            f"not supported ({why})")

  for key in ("attention_bias", "mlp_bias", "use_sliding_window",
              "use_bidirectional_attention"):
    if d.get(key) and not (key == "attention_bias" and family == "qwen2"):
      unsupported(key, "no such variant in tunejax")
  act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
  if act not in _ACT:
    unsupported("hidden_act", "expected silu or gelu_pytorch_tanh")
  heads = d["num_attention_heads"]
  n_layers = d["num_hidden_layers"]
  gemma = family.startswith("gemma")
  layer_types = tuple(_LAYER_TYPE.get(t, t) for t in d.get("layer_types")
                      or ()) if gemma else ()
  theta, scaling = _rope(d, "full_attention" if family == "gemma3" else None,
                         path)
  local_theta = _rope(d, "sliding_attention", path)[0] if (
      family == "gemma3") else None
  pdtype = dtype or ("bfloat16" if (d.get("dtype") or d.get("torch_dtype"))
                     == "bfloat16" else "float32")
  eos = _first(d.get("eos_token_id"))
  pad = d.get("pad_token_id")
  try:
    return ModelConfig(
        family=family, vocab_size=d["vocab_size"], d_model=d["hidden_size"],
        n_layers=n_layers, n_heads=heads,
        n_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        mlp_dim=d["intermediate_size"], rope_theta=theta,
        rope_local_theta=local_theta, rope_scaling=scaling,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if gemma else 0.0, qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "gemma3"), mlp_act=_ACT[act],
        post_norms=gemma, attn_softcap=d.get("attn_logit_softcapping"),
        final_logit_softcap=d.get("final_logit_softcapping"),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
        embed_scale=gemma,
        sliding_window=d.get("sliding_window") if gemma else None,
        layer_types=layer_types,
        tie_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        param_dtype=pdtype, dtype=pdtype,
        bos_id=int(_first(d.get("bos_token_id")) or 0),
        eos_id=int(eos if eos is not None else 0),
        pad_id=int(pad if pad is not None else (eos or 0)),
        max_seq_len=int(d.get("max_position_embeddings", 2048)))
  except (errors.TunejaxError, KeyError, TypeError) as e:
    raise errors.ModelError(f"{path}: cannot build a model config ({e})")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """config.json contents for `cfg` (transformers 5.x spelling)."""
  gemma = cfg.family.startswith("gemma")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    rope.update(cfg.rope_scaling)
  d = {
      "architectures": [_ARCH[cfg.family]],
      "model_type": _MODEL_TYPE[cfg.family],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      ("hidden_activation" if gemma else "hidden_act"):
          "gelu_pytorch_tanh" if cfg.mlp_act == "gelu_tanh" else "silu",
      "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_seq_len,
      "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
      "pad_token_id": cfg.pad_id, "rope_theta": cfg.rope_theta,
      "rope_parameters": rope, "dtype": cfg.param_dtype,
      "attention_bias": cfg.qkv_bias,
  }
  if gemma:
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    # transformers' Gemma 3 config validates this field as an int.
    scalar = int(scalar) if float(scalar).is_integer() else scalar
    d.update(query_pre_attn_scalar=scalar,
             sliding_window=cfg.sliding_window,
             attn_logit_softcapping=cfg.attn_softcap,
             final_logit_softcapping=cfg.final_logit_softcap,
             layer_types=[{"global": "full_attention",
                           "local": "sliding_attention"}[t]
                          for t in cfg.layer_types])
  if cfg.family == "gemma3":
    d["rope_parameters"] = {
        "full_attention": rope,
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": cfg.local_theta}}
    d["rope_local_base_freq"] = cfg.local_theta
  return d


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
  """{tunejax name: (HF name, transpose)}; '{i}' marks the layer index.

  HF linears are [out, in]; tunejax kernels are [in, out].
  """
  gemma = cfg.family.startswith("gemma")
  m = {"embed/embedding": ("model.embed_tokens.weight", False),
       "final_norm/scale": ("model.norm.weight", False)}
  if not cfg.tie_embeddings:
    m["lm_head/kernel"] = ("lm_head.weight", True)
  lay = "model.layers.{i}."
  per_layer = {
      "attn_norm/scale": ("input_layernorm.weight", False),
      "mlp_norm/scale": (("pre_feedforward_layernorm.weight" if gemma
                          else "post_attention_layernorm.weight"), False),
      "mlp/gate/kernel": ("mlp.gate_proj.weight", True),
      "mlp/up/kernel": ("mlp.up_proj.weight", True),
      "mlp/down/kernel": ("mlp.down_proj.weight", True),
  }
  for p in "qkvo":
    per_layer[f"attn/{p}/kernel"] = (f"self_attn.{p}_proj.weight", True)
  if cfg.qkv_bias:
    for p in "qkv":
      per_layer[f"attn/{p}/bias"] = (f"self_attn.{p}_proj.bias", False)
  if cfg.qk_norm:
    for p in "qk":
      per_layer[f"attn/{p}_norm/scale"] = (f"self_attn.{p}_norm.weight", False)
  if cfg.post_norms:
    per_layer["post_attn_norm/scale"] = ("post_attention_layernorm.weight",
                                         False)
    per_layer["post_mlp_norm/scale"] = ("post_feedforward_layernorm.weight",
                                        False)
  for k, (name, t) in per_layer.items():
    m["layers/" + k] = (lay + name, t)
  return m
