"""`ModelConfig` and named presets for the decoder families tunejax supports.

One config covers Llama 3.x, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 through
switches (biases, q/k norms, post norms, softcaps, sliding windows...). The
config is a frozen, hashable dataclass so it can be a static jit argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tunejax import errors

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


def _family_layer_types(family: str, n_layers: int) -> tuple[str, ...]:
  """Per-layer attention type ('global' | 'local') of a family's pattern."""
  if family == "gemma2":  # Alternating, starting with a sliding-window layer.
    return tuple("local" if i % 2 == 0 else "global" for i in range(n_layers))
  if family == "gemma3":  # 5 local : 1 global.
    return tuple("global" if (i + 1) % 6 == 0 else "local"
                 for i in range(n_layers))
  return ("global",) * n_layers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one decoder-only Transformer.

  Norm scales are stored in the Hugging Face convention: with
  `norm_offset=1.0` (Gemma) the RMSNorm multiplies by `(1 + scale)`.
  """
  family: str = "llama"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 10_000.0
  rope_local_theta: float | None = None  # Gemma 3 local layers; None = same.
  # {'rope_type': 'llama3', 'factor', 'low_freq_factor', 'high_freq_factor',
  #  'original_max_position_embeddings'} or {'rope_type': 'linear', 'factor'};
  # applied to global layers only (Gemma 3 convention).
  rope_scaling: dict | None = None
  norm_eps: float = 1e-6
  norm_offset: float = 0.0
  qkv_bias: bool = False
  qk_norm: bool = False
  mlp_act: str = "silu"  # 'silu' | 'gelu_tanh'
  post_norms: bool = False
  attn_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None  # None: scale by head_dim**-0.5.
  embed_scale: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()  # () = the family's pattern.
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"  # 'none' | 'full' | 'save_dots'
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 0
  max_seq_len: int = 2048
  # LongLoRA S²-Attn (`layers.s2_attention`): group size G > 0 replaces
  # dense attention in forwards without a KV cache (training, eval); 0 =
  # dense. Generation always attends densely.
  s2_group: int = 0

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types",
                         _family_layer_types(self.family, self.n_layers))
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    self.validate()

  def validate(self):
    """Raises ConfigError on inconsistent values."""
    def bad(key, msg):
      raise errors.ConfigError(f"config.model.{key}: {msg}")
    if self.family not in FAMILIES:
      bad("family", f"expected one of {list(FAMILIES)}, got {self.family!r}")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads "
          f"{self.n_heads}")
    if len(self.layer_types) != self.n_layers or not set(
        self.layer_types) <= {"global", "local"}:
      bad("layer_types", f"need {self.n_layers} of 'global'|'local', got "
          f"{self.layer_types}")
    if "local" in self.layer_types and not self.sliding_window:
      bad("sliding_window", "local layers need a sliding_window")
    if self.mlp_act not in ("silu", "gelu_tanh"):
      bad("mlp_act", f"expected 'silu' or 'gelu_tanh', got {self.mlp_act!r}")
    if self.remat not in ("none", "full", "save_dots"):
      bad("remat", f"expected 'none', 'full' or 'save_dots', got "
          f"{self.remat!r}")
    if self.s2_group < 0 or self.s2_group % 2 or (
        self.s2_group and self.n_heads % 2):
      bad("s2_group", f"S²-Attn needs an even group size >= 0 and an even "
          f"n_heads, got {self.s2_group} and {self.n_heads}")
    for key in ("param_dtype", "dtype"):
      if getattr(self, key) not in ("float32", "bfloat16"):
        bad(key, f"expected 'float32' or 'bfloat16', got "
            f"{getattr(self, key)!r}")
    if self.rope_scaling is not None and self.rope_scaling.get(
        "rope_type") not in ("llama3", "linear"):
      bad("rope_scaling", f"unsupported {self.rope_scaling}")

  def __hash__(self):
    # rope_scaling is a dict; hash its items so the config stays a valid
    # static jit argument.
    items = []
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      items.append(tuple(sorted(v.items())) if isinstance(v, dict) else v)
    return hash(tuple(items))

  def replace(self, **changes: Any) -> "ModelConfig":
    if "n_layers" in changes and "layer_types" not in changes:
      changes["layer_types"] = ()  # Re-derive the family pattern.
    return dataclasses.replace(self, **changes)

  @property
  def local_theta(self) -> float:
    return self.rope_local_theta or self.rope_theta

  def n_params(self) -> int:
    """Number of parameters (embedding counted once when tied)."""
    d, k = self.d_model, self.head_dim
    attn = d * k * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += k * (self.n_heads + 2 * self.n_kv_heads)
    norms = d * (4 if self.post_norms else 2) + (2 * k if self.qk_norm else 0)
    layer = attn + 3 * d * self.mlp_dim + norms
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + embed + d

  def flops_per_token(self, seq_len: int, weight_grads: bool = True) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style.

    6 * (matmul parameters, incl. the unembedding) plus attention scores and
    values, 12 * H * K * T_eff per layer, where T_eff is the attended length
    (the window for local layers). Embedding gathers are free. With
    `weight_grads=False` (adapters on a frozen base: the backward skips the
    base weights' gradients) the matmuls count 4x: forward and activation
    gradients; attention is unchanged (its operands are activations).
    """
    d, k = self.d_model, self.head_dim
    per_layer = (d * k * (2 * self.n_heads + 2 * self.n_kv_heads)
                 + 3 * d * self.mlp_dim)
    dense = self.n_layers * per_layer + d * self.vocab_size
    attn = 0
    for t in self.layer_types:
      t_eff = min(seq_len, self.sliding_window) if t == "local" else seq_len
      attn += 12 * self.n_heads * k * t_eff
    return (6.0 if weight_grads else 4.0) * dense + attn


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
_GEMMA = dict(norm_offset=1.0, mlp_act="gelu_tanh", post_norms=True,
              embed_scale=True, tie_embeddings=True, bos_id=2, eos_id=1,
              pad_id=0)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "tiny-gemma3": ModelConfig(
        family="gemma3", qk_norm=True, query_pre_attn_scalar=16.0,
        rope_theta=1e6, rope_local_theta=1e4, sliding_window=8,
        layer_types=("local", "global"), **_GEMMA),
    "gemma3-270m": ModelConfig(
        family="gemma3", vocab_size=262_144, d_model=640, n_layers=18,
        n_heads=4, n_kv_heads=1, head_dim=256, mlp_dim=2048, rope_theta=1e6,
        rope_local_theta=1e4, qk_norm=True, query_pre_attn_scalar=256.0,
        sliding_window=512, max_seq_len=32_768, **_GEMMA),
    "gemma2-2b": ModelConfig(
        family="gemma2", vocab_size=256_000, d_model=2304, n_layers=26,
        n_heads=8, n_kv_heads=4, head_dim=256, mlp_dim=9216,
        attn_softcap=50.0, final_logit_softcap=30.0,
        query_pre_attn_scalar=256.0, sliding_window=4096, max_seq_len=8192,
        **_GEMMA),
    "llama3-8b": ModelConfig(  # Llama 3.1 8B.
        family="llama", vocab_size=128_256, d_model=4096, n_layers=32,
        n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=14_336,
        rope_theta=500_000.0, rope_scaling=_LLAMA31_SCALING, norm_eps=1e-5,
        bos_id=128_000, eos_id=128_001, pad_id=128_001, max_seq_len=131_072),
    "llama3.2-1b": ModelConfig(
        family="llama", vocab_size=128_256, d_model=2048, n_layers=16,
        n_heads=32, n_kv_heads=8, head_dim=64, mlp_dim=8192,
        rope_theta=500_000.0, rope_scaling={**_LLAMA31_SCALING, "factor": 32.0},
        norm_eps=1e-5, tie_embeddings=True, bos_id=128_000, eos_id=128_001,
        pad_id=128_001, max_seq_len=131_072),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151_936, d_model=896, n_layers=24,
        n_heads=14, n_kv_heads=2, head_dim=64, mlp_dim=4864,
        rope_theta=1e6, qkv_bias=True, tie_embeddings=True, bos_id=151_643,
        eos_id=151_643, pad_id=151_643, max_seq_len=32_768),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151_936, d_model=1024, n_layers=28,
        n_heads=16, n_kv_heads=8, head_dim=128, mlp_dim=3072,
        rope_theta=1e6, qk_norm=True, tie_embeddings=True, bos_id=151_643,
        eos_id=151_645, pad_id=151_643, max_seq_len=40_960),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """The preset `name`, optionally with fields replaced."""
  if name not in PRESETS:
    raise errors.ModelError(
        f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  cfg = PRESETS[name]
  return cfg.replace(**overrides) if overrides else cfg
