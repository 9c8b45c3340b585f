"""Parameter names, shapes, logical axes and random init of the decoder.

Parameters are a plain nested dict; `param_specs` is the one table of every
parameter's '/'-joined name, shape, logical axes and init rule. Layer
parameters are stacked on a leading `n_layers` axis (scanned).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tunejax import sharding as sh
from tunejax import tree
from tunejax.models.config import ModelConfig


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str  # 'normal' | 'zeros' | 'norm'


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
  """{'/'-joined name: ParamSpec} of every parameter of `cfg`'s model."""
  d, k, f, n = cfg.d_model, cfg.head_dim, cfg.mlp_dim, cfg.n_layers
  hk, gk = cfg.n_heads * k, cfg.n_kv_heads * k
  specs = {"embed/embedding": ParamSpec((cfg.vocab_size, d),
                                        (sh.VOCAB, sh.EMBED), "normal")}
  if not cfg.tie_embeddings:
    specs["lm_head/kernel"] = ParamSpec((d, cfg.vocab_size),
                                        (sh.EMBED, sh.VOCAB), "normal")
  specs["final_norm/scale"] = ParamSpec((d,), (sh.NORM,), "norm")

  def layer(name, shape, axes, init="normal"):
    specs["layers/" + name] = ParamSpec((n, *shape), (sh.LAYERS, *axes), init)

  layer("attn_norm/scale", (d,), (sh.NORM,), "norm")
  layer("attn/q/kernel", (d, hk), (sh.EMBED, sh.Q_HEADS))
  layer("attn/k/kernel", (d, gk), (sh.EMBED, sh.KV_HEADS))
  layer("attn/v/kernel", (d, gk), (sh.EMBED, sh.KV_HEADS))
  layer("attn/o/kernel", (hk, d), (sh.Q_HEADS, sh.EMBED))
  if cfg.qkv_bias:
    layer("attn/q/bias", (hk,), (sh.Q_HEADS,), "zeros")
    layer("attn/k/bias", (gk,), (sh.KV_HEADS,), "zeros")
    layer("attn/v/bias", (gk,), (sh.KV_HEADS,), "zeros")
  if cfg.qk_norm:
    layer("attn/q_norm/scale", (k,), (sh.NORM,), "norm")
    layer("attn/k_norm/scale", (k,), (sh.NORM,), "norm")
  if cfg.post_norms:
    layer("post_attn_norm/scale", (d,), (sh.NORM,), "norm")
    layer("post_mlp_norm/scale", (d,), (sh.NORM,), "norm")
  layer("mlp_norm/scale", (d,), (sh.NORM,), "norm")
  layer("mlp/gate/kernel", (d, f), (sh.EMBED, sh.MLP))
  layer("mlp/up/kernel", (d, f), (sh.EMBED, sh.MLP))
  layer("mlp/down/kernel", (f, d), (sh.MLP, sh.EMBED))
  return specs


def param_axes(cfg: ModelConfig) -> dict:
  """Tree like the params whose leaves are tuples of logical axis names."""
  return tree.unflatten({k: s.axes for k, s in param_specs(cfg).items()})


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Random parameters (truncation-free normal, std 0.02; unit norms)."""
  dtype = jnp.dtype(cfg.param_dtype)
  specs = param_specs(cfg)
  keys = jax.random.split(rng, len(specs))
  flat = {}
  for key, (name, s) in zip(keys, specs.items()):
    if s.init == "normal":
      x = 0.02 * jax.random.normal(key, s.shape, jnp.float32)
    elif s.init == "norm":  # Norm scale multiplies by offset + scale == 1.
      x = jnp.full(s.shape, 1.0 - cfg.norm_offset, jnp.float32)
    else:
      x = jnp.zeros(s.shape, jnp.float32)
    flat[name] = x.astype(dtype)
  return tree.unflatten(flat)
