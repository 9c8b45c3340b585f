"""One decoder-only Transformer for all supported families, as pure functions.

Parameters are a plain nested dict (`params.param_specs` lists names,
shapes and logical axes); layer parameters are always stacked on a leading
`n_layers` axis and the layer stack runs under `lax.scan` (or a Python loop
when `cfg.scan_layers` is False). Per-layer attention type (global / sliding
window, RoPE base) is scanned data, so Gemma 2/3 patterns scan too.

Every linear, the embedding and the named activation points go through a
`Seam`, so PEFT methods plug in without the model knowing about them.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tunejax import sharding as sh
from tunejax.models import layers
from tunejax.models import seam as seam_lib
from tunejax.models.config import ModelConfig
from tunejax.models.seam import DEFAULT_SEAM, Seam

_BLD = (sh.ACT_BATCH, sh.ACT_LEN, sh.ACT_EMBED)


def _sub(node: dict | None, *path: str) -> dict:
  for p in path:
    node = (node or {}).get(p)
  return node or {}


class _Context(NamedTuple):
  """Per-call data shared by all layers: masks and RoPE tables.

  Masks are (global, local-or-None) pairs; `cache_masks` covers the KV-cache
  slots written by earlier calls (None without a cache).
  """
  masks: tuple
  cache_masks: tuple | None
  rope_global: tuple[jax.Array, jax.Array]
  rope_local: tuple[jax.Array, jax.Array] | None
  prefix_masks: tuple | None = None  # [B, L, P] pairs for `Seam.prefix`
  # [B, L] key weights: report each layer's attention mass on them as the
  # side output 'attn/probe_mass' [B, L] (ssToken's attention importance).
  attn_probe: jax.Array | None = None


def _pick(pair, is_local):
  """The local or global member of a (global, local-or-None) pair."""
  glob, loc = pair
  return glob if loc is None else jnp.where(is_local, loc, glob)


def _layer(cfg: ModelConfig, seam: Seam, ctx: _Context, x: jax.Array,
           lp: dict, la: dict, is_local: jax.Array, cache_kv, prefix_kv=None,
           *, return_kv: bool, window: int | None = None):
  """One pre-norm decoder block.

  `cache_kv` is None or this layer's (k, v, slot) with k, v its cache
  buffers ([B, G, S, K], maybe squeezed: `layers.cache_write`): this
  call's keys/values are first written at `slot` and the layer attends over
  the updated buffers alone (`ctx.cache_masks`; over their last `window`
  slots only, when given), returning them as its new kv. Writing before
  reading lets XLA update the buffers in place (read-then-write made it
  copy every layer's cache each decode step).
  `prefix_kv` is None or this layer's (k, v) prefix [P, G·K] (shared keys).
  Returns (x, (this call's (k, v) [B, G, L, K] if `return_kv` else None,
  aux)), where aux is {'<module>/<key>': array} from seams that return
  side outputs (router balance terms, activation statistics, ...).
  """
  b, l, _ = x.shape
  norm = functools.partial(layers.rms_norm, eps=cfg.norm_eps,
                           offset=cfg.norm_offset)

  aux = {}

  def taps(name, out):
    """Seam results are arrays or (array, {key: aux array}) pairs."""
    if isinstance(out, tuple):
      out, extra = out
      aux.update({f"{name}/{k}": v for k, v in extra.items()})
    return out

  def linear(name, inp, p, a):
    return taps(name, seam.linear("layers/" + name, inp, p["kernel"],
                                  p.get("bias"), a))

  def act(name, inp, a):
    return taps(name, seam.act(name, inp, a))

  h = norm(x, lp["attn_norm"]["scale"])
  at, aa = lp["attn"], _sub(la, "attn")
  q = linear("attn/q", h, at["q"], _sub(aa, "q")).reshape(b, l, cfg.n_heads,
                                                         cfg.head_dim)
  kv_shape = (b, l, cfg.n_kv_heads, cfg.head_dim)
  k = linear("attn/k", h, at["k"], _sub(aa, "k")).reshape(kv_shape)
  v = linear("attn/v", h, at["v"], _sub(aa, "v")).reshape(kv_shape)
  if cfg.qk_norm:
    q = norm(q, at["q_norm"]["scale"])
    k = norm(k, at["k_norm"]["scale"])
  q = sh.constrain(q, (sh.ACT_BATCH, sh.ACT_LEN, sh.ACT_HEADS, None))
  cos, sin = ctx.rope_global
  if ctx.rope_local is not None:
    cos = jnp.where(is_local, ctx.rope_local[0], cos)
    sin = jnp.where(is_local, ctx.rope_local[1], sin)
  q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
  k = act("attn/k", k, _sub(aa, "k"))
  v = act("attn/v", v, _sub(aa, "v"))
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, L, K]
  blocks = [(k, v, _pick(ctx.masks, is_local))]
  if cache_kv is not None:
    kbuf, vbuf, slot = cache_kv
    k, v = (layers.cache_write(buf, new, slot)
            for buf, new in ((kbuf, k), (vbuf, v)))
    kw, vw, mw = layers.cache_window(k, v, _pick(ctx.cache_masks, is_local),
                                     slot, l, window)
    view = lambda x: x.reshape(b, cfg.n_kv_heads, x.shape[-2], -1)
    blocks = [(view(kw), view(vw), mw)]
  if prefix_kv is not None:
    p_len, g, kd = prefix_kv[0].shape[0], cfg.n_kv_heads, cfg.head_dim
    pk, pv = (jnp.broadcast_to(  # [P, G·K] -> [B, G, P, K]
        a.reshape(p_len, g, kd).transpose(1, 0, 2)[None], (b, g, p_len, kd))
              for a in prefix_kv)
    blocks.insert(0, (pk, pv, _pick(ctx.prefix_masks, is_local)))
  if ctx.attn_probe is not None:
    o, aux["attn/probe_mass"] = layers.attention(
        cfg, q, blocks, ctx.attn_probe, causal=cache_kv is None)
  elif cfg.s2_group and not return_kv and len(blocks) == 1:
    # LongLoRA's S²-Attn is a training-time approximation; generation (which
    # always goes through a cache) attends in full, as in the paper.
    o = layers.s2_attention(cfg, q, *blocks[0], cfg.s2_group)
  else:
    o = layers.attention(cfg, q, blocks, causal=cache_kv is None)
  o = act("attn/heads", o, _sub(aa, "heads"))
  o = linear("attn/o", o.reshape(b, l, -1), at["o"], _sub(aa, "o"))
  if cfg.post_norms:
    o = norm(o, lp["post_attn_norm"]["scale"])
  x = sh.constrain(x + o, _BLD)

  h = norm(x, lp["mlp_norm"]["scale"])
  mp, ma = lp["mlp"], _sub(la, "mlp")
  gate = linear("mlp/gate", h, mp["gate"], _sub(ma, "gate"))
  up = linear("mlp/up", h, mp["up"], _sub(ma, "up"))
  hid = layers.mlp_activation(cfg.mlp_act, gate) * up
  hid = sh.constrain(hid, (sh.ACT_BATCH, sh.ACT_LEN, sh.ACT_MLP))
  hid = act("mlp/hidden", hid, _sub(ma, "hidden"))
  o = linear("mlp/down", hid, mp["down"], _sub(ma, "down"))
  if cfg.post_norms:
    o = norm(o, lp["post_mlp_norm"]["scale"])
  new_kv = (k, v) if return_kv else None
  return sh.constrain(x + o, _BLD), (new_kv, aux)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _masks(cfg: ModelConfig, *args, extra=None) -> tuple:
  """(global, local-or-None) masks from `layers.attention_mask` args."""
  glob = layers.attention_mask(*args, None)
  loc = (layers.attention_mask(*args, cfg.sliding_window)
         if "local" in cfg.layer_types else None)
  if extra is not None:
    glob, loc = glob & extra, None if loc is None else loc & extra
  return glob, loc


def _rope(cfg: ModelConfig, positions_BxL):
  glob = layers.rope_tables(positions_BxL, layers.inv_freq(
      cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  if "local" not in cfg.layer_types:
    return glob, None
  return glob, layers.rope_tables(positions_BxL, layers.inv_freq(
      cfg.head_dim, cfg.local_theta, None))


def _stack(cfg: ModelConfig, seam: Seam, ctx: _Context, x, params, adapters,
           cache_kv, return_kv: bool, prefix_kv=None, local_window=None):
  """Runs all layers (scan or Python loop); with a cache, local layers read
  only their last `local_window` slots (`layers.cache_window`).

  Returns (x, (new kv or None, aux)); aux leaves are stacked over layers.
  """
  is_local = jnp.asarray(np.array([t == "local" for t in cfg.layer_types]))

  def layer_fn(window=None):  # window: static, so bound before remat
    f = functools.partial(_layer, cfg, seam, ctx, return_kv=return_kv,
                          window=window)
    if cfg.remat == "none":
      return f
    return jax.checkpoint(f, policy=_REMAT_POLICIES[cfg.remat])

  body = layer_fn()
  lp_all, la_all = params["layers"], _sub(adapters, "layers")
  split = isinstance(lp_all, (list, tuple))  # see `split_layers`
  if split or not cfg.scan_layers:
    outs = []
    for i in range(cfg.n_layers):
      pick = lambda t, i=i: jax.tree.map(lambda a: a[i], t)
      lp = lp_all[i] if split else pick(lp_all)
      kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i],
                                           cache_kv[2])
      fn = (layer_fn(local_window) if local_window
            and cfg.layer_types[i] == "local" else body)
      x, out = fn(x, lp, pick(la_all), is_local[i], kv, pick(prefix_kv))
      outs.append(out)
    aux = jax.tree.map(lambda *a: jnp.stack(a), *[o[1] for o in outs])
    kvs = [o[0] for o in outs]
    if kvs[0] is None:
      return x, (None, aux)
    if split:  # per-layer lists (full cache buffers are never stacked)
      return x, (([k for k, _ in kvs], [v for _, v in kvs]), aux)
    return x, (jax.tree.map(lambda *a: jnp.stack(a), *kvs), aux)

  def step(x, xs):
    return body(x, *xs)

  return jax.lax.scan(step, x, (lp_all, la_all, is_local, cache_kv,
                                prefix_kv))


def split_layers(params: dict) -> dict:
  """params with "layers" as a list of per-layer trees (unrolled layers);
  already split params are returned as they are.

  For decoding: each layer's matrices become their own buffers, read in
  place by the matmuls, instead of being sliced (copied) out of the stacked
  arrays at every step. Inside `generate` the split is a copy of the layer
  weights per call; RL rollouts on a frozen base split it once and pass
  the split params to every `generate` call.
  """
  if isinstance(params["layers"], (list, tuple)):
    return params
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i],
                                            params["layers"])
                               for i in range(n)]}


def decode(cfg: ModelConfig, params: dict, tokens_BxL, positions_BxL,
           segment_ids_BxL, *, adapters=None, seam: Seam = DEFAULT_SEAM,
           cache=None, attend_cache: bool = True, return_aux: bool = False,
           attn_probe_BxL: jax.Array | None = None):
  """Final-normed hidden states, optionally through a KV cache.

  `cache` is None (attend within `tokens`) or a dict with 'k', 'v' (lists
  of n_layers buffers [B, G, S, K], or without their size-1 B / G dims:
  see `layers.cache_write`), 'pos', 'seg' [B, S] (key positions and
  segment ids, 0 = empty) and 'slot' (scalar: slots before it are filled).
  The tokens' keys, values, positions and segments are written at `slot`,
  then the tokens attend to the filled slots (their own causally), and
  `slot` advances by L; with a cache, layers run unrolled on
  `split_layers(params)`. `attend_cache=False` skips reading the cache
  (prefill of an empty cache). Returns (h_BxLxD, cache), or (h_BxLxD,
  cache, aux) with `return_aux` (see `_layer`).

  Virtual tokens (see `seam.py`): positions are shifted by
  `seam.position_offset`; soft-prompt embeddings are prepended without a
  cache or at prefill (and written to the cache with segment id -1); a
  prefix is one more attention block per layer. `h` covers real tokens only.

  `attn_probe_BxL` (key weights, no cache) adds each layer's attention mass
  on the weighted keys to aux as 'attn/probe_mass' [n_layers, B, L].
  """
  dtype = jnp.dtype(cfg.dtype)
  adapters = adapters or {}
  offset = seam.position_offset(adapters)
  x = seam.embed(tokens_BxL, params["embed"]["embedding"],
                 _sub(adapters, "embed"))
  x, virtual = seam.prompt(x, positions_BxL, _sub(adapters, "prompt"))
  positions_BxL = positions_BxL + offset
  n_virtual = 0
  if virtual is not None and (cache is None or not attend_cache):
    x, positions_BxL, segment_ids_BxL = seam_lib.prepend_virtual(
        virtual, x, positions_BxL, segment_ids_BxL, offset)
    n_virtual = virtual.shape[0]
  x = x.astype(dtype)
  l = x.shape[1]
  if cfg.embed_scale:  # HF rounds the scale to the compute dtype first.
    x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
  x = sh.constrain(x, _BLD)
  idx = jnp.arange(l)
  masks = _masks(cfg, idx, idx, positions_BxL, positions_BxL,
                 segment_ids_BxL, segment_ids_BxL)
  cache_masks, cache_kv = None, None
  put = lambda buf, new, at: jax.lax.dynamic_update_slice(
      buf, new.astype(buf.dtype), at)
  if cache is not None:
    if not isinstance(params["layers"], (list, tuple)):
      params = split_layers(params)  # generate() splits once, outside
    slot = cache["slot"]
    cache = {**cache, "pos": put(cache["pos"], positions_BxL, (0, slot)),
             "seg": put(cache["seg"], segment_ids_BxL, (0, slot))}
  if cache is not None and attend_cache:
    # Keys at slot.. are this call's own tokens (written first); causality
    # by slot index hides the empty slots after them.
    k_idx = jnp.arange(cache["pos"].shape[1])
    cache_masks = _masks(cfg, idx + slot, k_idx, positions_BxL,
                         cache["pos"], segment_ids_BxL, cache["seg"])
    cache_kv = (cache["k"], cache["v"], slot)
  prefix_kv = seam.prefix(adapters)
  prefix_masks = None
  if prefix_kv is not None:
    p = prefix_kv[0].shape[1]
    b = tokens_BxL.shape[0]
    prefix_masks = _masks(cfg, idx + p, jnp.arange(p), positions_BxL,
                          seam_lib.virtual_positions(offset, p, b),
                          segment_ids_BxL,
                          jnp.full((b, p), -1, jnp.int32))
  if attn_probe_BxL is not None and n_virtual:
    attn_probe_BxL = jnp.pad(attn_probe_BxL, ((0, 0), (n_virtual, 0)))
  ctx = _Context(masks, cache_masks, *_rope(cfg, positions_BxL),
                 prefix_masks, attn_probe_BxL)
  # Virtual tokens break slot distance = position distance (cache_window).
  window = cfg.sliding_window if cache_kv is not None and not offset else None
  x, (new_kv, aux) = _stack(cfg, seam, ctx, x, params, adapters, cache_kv,
                            cache is not None, prefix_kv, window)
  h = layers.rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps,
                      cfg.norm_offset)
  if cache is not None:
    k, v = new_kv
    if not attend_cache:  # prefill: the layers returned their new kv only
      k, v = ([put(c, n, (0, 0, slot, 0)) for c, n in zip(cache[name], new)]
              for name, new in (("k", k), ("v", v)))
    cache = {**cache, "k": k, "v": v, "slot": slot + l}
  h = h[:, n_virtual:]
  return (h, cache, aux) if return_aux else (h, cache)


def _defaults(tokens_BxL, positions, segment_ids):
  b, l = tokens_BxL.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  if segment_ids is None:
    segment_ids = jnp.ones((b, l), jnp.int32)
  return positions, segment_ids


def hidden(cfg: ModelConfig, params: dict, tokens_BxL: jax.Array,
           positions_BxL: jax.Array | None = None,
           segment_ids_BxL: jax.Array | None = None, *, adapters=None,
           seam: Seam | None = None, return_aux: bool = False,
           attn_probe_BxL: jax.Array | None = None):
  """Final-normed hidden states [B, L, D] (compute dtype), pre-unembedding.

  `positions` default to 0..L-1; `segment_ids` (0 = padding) default to all
  ones. Tokens attend only to earlier tokens of the same segment. With
  `return_aux`, returns (h, aux): the seams' side outputs, each stacked
  over layers ({'attn/q/<key>': [n_layers, ...], ...}), plus
  'attn/probe_mass' with `attn_probe_BxL` (see `decode`).
  """
  positions, segs = _defaults(tokens_BxL, positions_BxL, segment_ids_BxL)
  out = decode(cfg, params, tokens_BxL, positions, segs, adapters=adapters,
               seam=seam or DEFAULT_SEAM, return_aux=return_aux,
               attn_probe_BxL=attn_probe_BxL)
  return (out[0], out[2]) if return_aux else out[0]


def unembedding(cfg: ModelConfig, params: dict, *,
                as_stored: bool = False):
  """[D, V] output projection: tied embedding transposed or lm_head.

  With `as_stored`, returns (w, vocab_axis) without transposing: the tied
  table stays [V, D] (vocab_axis 0), which the fused loss op reads as is.
  """
  if cfg.tie_embeddings:
    w = params["embed"]["embedding"]
    return (w, 0) if as_stored else w.T
  w = params["lm_head"]["kernel"]
  return (w, 1) if as_stored else w


def logits_from_hidden(cfg: ModelConfig, params: dict, h_BxLxD: jax.Array,
                       *, adapters=None, seam: Seam | None = None):
  """float32 logits (with the final softcap) from final hidden states."""
  seam = seam or DEFAULT_SEAM
  w = unembedding(cfg, params)
  logits = seam.linear("lm_head", h_BxLxD, w, None, _sub(adapters, "lm_head"))
  logits = logits.astype(jnp.float32)
  if cfg.final_logit_softcap is not None:
    cap = cfg.final_logit_softcap
    logits = jnp.tanh(logits / cap) * cap
  return sh.constrain(logits, (sh.ACT_BATCH, sh.ACT_LEN, sh.ACT_VOCAB))


def forward(cfg: ModelConfig, params: dict, tokens_BxL: jax.Array,
            positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, *, adapters=None,
            seam: Seam | None = None) -> jax.Array:
  """Logits [B, L, V] in float32 (naive path; losses use hidden + fused op)."""
  h = hidden(cfg, params, tokens_BxL, positions, segment_ids,
             adapters=adapters, seam=seam)
  return logits_from_hidden(cfg, params, h, adapters=adapters, seam=seam)
