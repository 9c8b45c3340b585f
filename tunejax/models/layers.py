"""Numerical building blocks of the decoder: RMSNorm, RoPE, masks, attention.

Pure functions of arrays. Conventions follow Hugging Face transformers so
that logits match to float32 rounding: RoPE uses `rotate_half` (first half /
second half of the head dimension), softmax runs in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tunejax import errors
from tunejax.models import attend as attend_lib
from tunejax.models.config import ModelConfig



def rms_norm(x: jax.Array, scale: jax.Array, eps: float,
             offset: float) -> jax.Array:
  """RMSNorm in float32; multiplies by `offset + scale` (HF convention)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
  """RoPE inverse frequencies [K/2] (float32), with optional scaling."""
  exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  freq = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
  if scaling is None:
    return freq
  factor = float(scaling["factor"])
  if scaling["rope_type"] == "linear":
    return (freq / factor).astype(np.float32)
  # llama3: long wavelengths divided by `factor`, short ones kept, a smooth
  # interpolation in between.
  old_len = float(scaling["original_max_position_embeddings"])
  low, high = float(scaling["low_freq_factor"]), float(
      scaling["high_freq_factor"])
  wavelen = 2 * math.pi / freq
  scaled = np.where(wavelen > old_len / low, freq / factor, freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BxL: jax.Array, freq_half: np.ndarray):
  """(cos, sin) tables [B, L, K] for `apply_rope`."""
  angles = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(
      freq_half)
  angles = jnp.concatenate([angles, angles], axis=-1)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if jax.default_backend() == "cpu":
    # XLA:CPU fuses these transcendentals into every consumer, recomputing
    # them per head and per use (a third of W1's elementwise time) and it
    # drops optimization barriers. A product with the identity is exact and
    # is never fused into its consumers, so each table is computed once.
    eye_KxK = jnp.eye(cos.shape[-1], dtype=cos.dtype)
    cos, sin = (jnp.matmul(t, eye_KxK, precision=jax.lax.Precision.HIGHEST)
                for t in (cos, sin))
  return cos, sin


def apply_rope(x_BxLxNxK: jax.Array, cos_BxLxK: jax.Array,
               sin_BxLxK: jax.Array) -> jax.Array:
  """Rotary embedding, HF `rotate_half` convention, computed in float32."""
  x = x_BxLxNxK.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos_BxLxK[:, :, None, :], sin_BxLxK[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_BxLxNxK.dtype)


def attention_mask(q_idx_L: jax.Array, k_idx_S: jax.Array,
                   q_pos_BxL: jax.Array, k_pos_BxS: jax.Array,
                   q_seg_BxL: jax.Array, k_seg_BxS: jax.Array,
                   window: int | None) -> jax.Array:
  """[B, L, S] bool: causal (by index) AND same segment AND in window.

  The window is measured on positions (q_pos - k_pos < window), as in HF, so
  it restarts with each packed document. A negative key segment marks a
  shared key (soft-prompt / prefix virtual tokens): every non-padding query
  sees it, so each packed document sees the shared prompt.
  """
  causal = (k_idx_S[None, :] <= q_idx_L[:, None])[None]
  q_seg, k_seg = q_seg_BxL[:, :, None], k_seg_BxS[:, None, :]
  same = (q_seg == k_seg) | ((k_seg < 0) & (q_seg > 0))
  mask = causal & same
  if window is not None:
    mask &= (q_pos_BxL[:, :, None] - k_pos_BxS[:, None, :]) < window
  return mask


def cache_write(buf, new_BxGxLxK, slot):
  """`buf` with `new` written at `slot`.

  `buf` is [B, G, S, K] or that shape without its size-1 B / G dims: a
  size-1 dim makes XLA bitcast the buffer for the attention products, then
  fuse the update into that bitcast as well as into the loop's output, two
  out-of-place updates (4 buffer copies per layer and step; Gemma 3 has
  one KV head): a Gemma 3-shaped step at slot 2048 took 42 ms, 14 ms in
  place. `generate` carries the buffers so (`generate._loop_layout`).
  """
  l, k = new_BxGxLxK.shape[2:]
  new = new_BxGxLxK.reshape(*buf.shape[:-2], l, k).astype(buf.dtype)
  return jax.lax.dynamic_update_slice(buf, new,
                                      (0,) * (buf.ndim - 2) + (slot, 0))


def cache_window(k_xSxK, v_xSxK, mask_BxLxS, slot, l: int,
                 window: int | None):
  """(k, v, mask) cut to the cache slots a local layer's queries can see
  (k, v: cache buffers [..., S, K]).

  Queries at slots [slot, slot + l) see at most the `window` keys up to
  each one, i.e. slots [slot + l - n, slot + l) with n = window + l - 1,
  whenever a row's positions grow by at least one per slot (left padding
  is masked by segment; virtual tokens before padded text break it, so
  `decode` reads whole buffers then). Reading n slots is exact (the rest
  is masked) and cuts a long decode's KV reads: Gemma 3 has 5 local
  layers in 6, window 512; bench/local_decode.py: a step at slot 2048
  takes 7.7-8.2 ms vs 14.0 ms reading whole buffers on a 2-core CPU.
  """
  s = k_xSxK.shape[-2]
  n = s if window is None else window + l - 1
  if n >= s:
    return k_xSxK, v_xSxK, mask_BxLxS
  start = jnp.clip(slot + l - n, 0, s - n)
  cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, n, axis)
  return cut(k_xSxK, -2), cut(v_xSxK, -2), cut(mask_BxLxS, -1)


def attention(cfg: ModelConfig, q_BxLxHxK: jax.Array, blocks,
              probe_BxS: jax.Array | None = None, causal: bool = False):
  """Grouped-query attention over key/value blocks -> [B, L, H, K].

  `blocks` is a sequence of (k [B, G, S, K], v [B, G, S, K], mask
  [B, L, S]); one softmax (float32) runs over all of them jointly (prefix
  tuning passes the prefix's keys, then the sequence's). The head-major
  key layout makes
  the score/value contractions plain batched matmuls (3x faster decode
  attention on CPU than [B, S, G, K]).

  `causal`: self-attention without a cache: a single block's mask is
  causal by index, so the masked upper triangle can be skipped, and
  several blocks (a prefix's keys, then the sequence's) are joined into one
  key axis for the memory-lean custom-VJP path. With a cache (not causal)
  blocks are never joined: that would copy the cache in every decode step.

  With `probe_BxS` (weights over the last block's keys), returns
  (out, mass_BxL): each query's head-averaged attention probability mass
  on the probed keys (ssToken's attention importance; no gradient).
  """
  b, l, h, k = q_BxLxHxK.shape
  g = blocks[0][0].shape[1]
  r = h // g
  # Queries of a kv group as one [R·L, K] matrix: both contractions become
  # (b, g)-batched GEMMs with a tall M (attention fwd+bwd 1.7x faster on
  # XLA:CPU than contracting [B, L, G, R, K] directly).
  q = q_BxLxHxK.reshape(b, l, g, r, k).transpose(0, 2, 3, 1, 4).reshape(
      b, g, r * l, k)
  scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
  if causal or len(blocks) == 1:
    ks, vs, masks = zip(*blocks)
    join = lambda xs, axis: xs[0] if len(xs) == 1 else jnp.concatenate(
        xs, axis=axis)
    kb, vb = (join([x.astype(q.dtype) for x in xs], 2) for xs in (ks, vs))
    mask = join(masks, -1)
    o = attend_lib.attend(
        q, kb, vb, mask, scale=scale, softcap=cfg.attn_softcap,
        causal_block=(attend_lib.causal_block(l, b * h)
                      if causal and len(blocks) == 1 else None))
  else:
    p = _joint_softmax(q, blocks, scale, cfg.attn_softcap)
    o, start = 0, 0
    for kb, vb, _ in blocks:
      pb = p[..., start:start + kb.shape[2]].astype(q.dtype)
      o = o + jnp.einsum("bgms,bgsk->bgmk", pb, vb.astype(q.dtype))
      start += kb.shape[2]
  o = _heads_last(o, b, l, g, r)
  if probe_BxS is None:
    return o
  # The probe is a statistic (no gradient): its [M, S] probabilities are a
  # forward temporary, never a saved residual.
  p = jax.lax.stop_gradient(
      _joint_softmax(q, blocks, scale, cfg.attn_softcap))
  p_own = p[..., p.shape[-1] - probe_BxS.shape[1]:].reshape(b, g, r, l, -1)
  mass = jnp.einsum("bgrls,bs->bl", p_own, probe_BxS.astype(jnp.float32))
  return o, mass / h


def _joint_softmax(q, blocks, scale: float, softcap: float | None):
  """float32 softmax over the keys of all blocks, [B, G, M, ΣS]."""
  scores = [attend_lib.scores(q, kb.astype(q.dtype), mask, scale, softcap)[0]
            for kb, _, mask in blocks]
  return jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)


def _heads_last(o_BxGxMxK, b: int, l: int, g: int, r: int) -> jax.Array:
  """[B, G, R·L, K] -> [B, L, H, K]."""
  k = o_BxGxMxK.shape[-1]
  o = o_BxGxMxK.reshape(b, g, r, l, k).transpose(0, 3, 1, 2, 4)
  return o.reshape(b, l, g * r, k)


def mlp_activation(name: str, x: jax.Array) -> jax.Array:
  if name == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=True)


def _s2_groups(x, n: int, axis: int):
  """Splits `axis` (length n·G) into n groups folded into the batch axis 0."""
  x = jnp.moveaxis(x, axis, 1)
  b, l = x.shape[:2]
  x = x.reshape(b * n, l // n, *x.shape[2:])
  return jnp.moveaxis(x, 1, axis)


def s2_attention(cfg: ModelConfig, q_BxLxHxK: jax.Array, k_BxGxLxK: jax.Array,
                 v_BxGxLxK: jax.Array, mask_BxLxL: jax.Array,
                 group: int) -> jax.Array:
  """LongLoRA's shifted sparse attention (S²-Attn) -> [B, L, H, K].

  Chen et al. 2023, "LongLoRA" (arXiv 2309.12307, §3.2 and its Algorithm 1;
  official `llama_attn_replace.py`): the sequence is cut into groups of
  `group` tokens that attend only within their group; the second half of
  the heads first rolls the sequence by -group/2, so its groups straddle
  the first half's boundaries, and rolls its output back. Attention cost
  is L·G instead of L².

  One deliberate difference: the rolled-around last group holds the last
  G/2 and the first G/2 tokens; the official code applies causality in the
  rolled order there, so the first tokens see the sequence's end (a future
  leak). Here the usual mask (causal by original index, same segment,
  window) is rolled along with the tokens, so causality and packing hold
  everywhere. With `group` = L both halves are dense causal attention.

  GQA: the first half of the query heads uses the first half of the kv
  heads when their count is even; otherwise the kv heads are repeated.
  """
  b, l, h, _ = q_BxLxHxK.shape
  g = k_BxGxLxK.shape[1]
  if l % group:
    raise errors.ConfigError(
        f"config.model.s2_group: sequence length {l} is not a multiple of "
        f"the S²-Attn group {group}")
  n, shift = l // group, group // 2
  k, v = k_BxGxLxK, v_BxGxLxK
  if g % 2:
    k, v = (jnp.repeat(x, h // g, axis=1) for x in (k, v))
    g = h
  halves = ((slice(0, h // 2), slice(0, g // 2)),
            (slice(h // 2, h), slice(g // 2, g)))
  outs = []
  for i, (hs, gs) in enumerate(halves):
    qi, ki, vi, m = q_BxLxHxK[:, :, hs], k[:, gs], v[:, gs], mask_BxLxL
    if i:  # shifted half: roll tokens (and the mask with them) by -G/2
      qi, ki, vi = (jnp.roll(x, -shift, axis=ax)
                    for x, ax in ((qi, 1), (ki, 2), (vi, 2)))
      m = jnp.roll(m, (-shift, -shift), axis=(1, 2))
    m = jnp.moveaxis(jnp.diagonal(m.reshape(b, n, group, n, group),
                                  axis1=1, axis2=3), -1, 1)
    o = attention(cfg, _s2_groups(qi, n, 1),
                  [(_s2_groups(ki, n, 2), _s2_groups(vi, n, 2),
                    m.reshape(b * n, group, group))])
    o = o.reshape(b, l, *o.shape[2:])
    outs.append(jnp.roll(o, shift, axis=1) if i else o)
  return jnp.concatenate(outs, axis=2)
