"""Batched sampling with a KV cache: one jitted prefill + `lax.while_loop`.

Prompts are left-padded to a common length P; padding has segment id 0 so
no real token attends to it, and positions restart at 0 at each prompt's
first real token (as HF does from the attention mask). The cache has
P + max_new_tokens slots per row; decode step t writes slot P + t. The loop
stops early once every row has emitted an EOS id.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tunejax import errors
from tunejax.models.config import ModelConfig
from tunejax.models.seam import DEFAULT_SEAM, Seam
from tunejax.models.transformer import (decode, logits_from_hidden,
                                        split_layers)

_BUCKET = 8  # Prompt lengths are padded up to a multiple (fewer compiles).


class GenerateOutput(NamedTuple):
  """New tokens (pad_id after EOS), their log-probs, generated lengths.

  `logps_BxT` is log softmax of the model's raw logits (before temperature,
  top-k, top-p) at the sampled token, 0 after a row stops. `lengths_B`
  counts tokens up to and including the EOS.
  """
  tokens_BxT: jax.Array
  logps_BxT: jax.Array
  lengths_B: jax.Array


def _order_keys(x):
  """uint32 keys with the order of the float32 values (NaN-free input)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _top_p(logits_BxV: jax.Array, top_p: float) -> jax.Array:
  """Logits outside the top-p nucleus set to -inf.

  The nucleus is every logit >= c, the largest c with softmax
  mass(logits >= c) >= top_p (the smallest prefix of the sorted
  distribution reaching top_p, ties at its edge kept). c is found by
  bisection over the 2^32 float keys, 32 masked sums: inside the decode
  loop XLA:CPU sorts a [B, V] row ~20x slower.
  """
  probs = jax.nn.softmax(logits_BxV, axis=-1)
  key = _order_keys(logits_BxV)

  def halve(_, lo_hi):  # invariant: mass(key >= lo) >= top_p
    lo, hi = lo_hi
    mid = lo + (hi - lo + 1) // 2
    ok = jnp.sum(jnp.where(key >= mid, probs, 0.0), axis=-1,
                 keepdims=True) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo_hi = (jnp.min(key, axis=-1, keepdims=True),
           jnp.max(key, axis=-1, keepdims=True))
  floor = jax.lax.fori_loop(0, 32, halve, lo_hi)[0]
  return jnp.where(key < floor, -jnp.inf, logits_BxV)


def _argmax(logits_BxV: jax.Array) -> jax.Array:
  """First index of the row maximum (as `jnp.argmax`), as two plain
  reductions: XLA:CPU's fused (value, index) reduce is 4-5x slower (0.56 ms
  a step at V=32k, batch 8). A NaN row gives index 0."""
  v = logits_BxV.shape[-1]
  top = jnp.max(logits_BxV, axis=-1, keepdims=True)
  idx = jnp.arange(v, dtype=jnp.int32)
  first = jnp.min(jnp.where(logits_BxV == top, idx, v), axis=-1)
  return jnp.where(first == v, 0, first)


def _sample(logits_BxV: jax.Array, rng: jax.Array, temperature: float,
            top_k: int | None, top_p: float | None) -> jax.Array:
  """Greedy (temperature 0) or temperature / top-k / top-p sampling."""
  if temperature == 0.0:
    return _argmax(logits_BxV)
  logits = logits_BxV / temperature
  if top_k is not None:
    # The min of the values (not their last column) keeps XLA:CPU on its
    # TopK kernel inside the loop; a slice made it sort every row (~80x).
    kth = jnp.min(jax.lax.top_k(logits, top_k)[0], axis=-1, keepdims=True)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    logits = _top_p(logits, top_p)
  # jax.random.categorical's Gumbel-max, with the faster argmax.
  return _argmax(logits + jax.random.gumbel(rng, logits.shape, logits.dtype))


def _loop_layout(cfg: ModelConfig, bufs, offset: int) -> list:
  """The layer cache buffers as the decode loop carries them, so that XLA
  updates each in place (measured by counting buffer copies in the loop):
  without size-1 B / G dims (see `layers.cache_write`), except a local
  layer's that `layers.cache_window` cuts, which stays [B, G, S, K] (its
  window read fused the update, cut from the squeezed form: 2 copies)."""
  s = bufs[0].shape[2]
  cut = not offset and cfg.sliding_window is not None and (
      cfg.sliding_window < s)
  squeeze = lambda x: x.reshape(*(d for d in x.shape[:2] if d > 1),
                                *x.shape[2:])
  return [x if cut and t == "local" else squeeze(x)
          for x, t in zip(bufs, cfg.layer_types)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _generate(cfg: ModelConfig, seam: Seam, max_new: int, temperature: float,
              top_k: int | None, top_p: float | None, eos_ids: tuple,
              num_samples: int, params, adapters, tokens_BxP, lengths_B, rng):
  b, p = tokens_BxP.shape
  offset = seam.position_offset(adapters)
  s = p + max_new + offset  # + virtual tokens
  dtype = jnp.dtype(cfg.dtype)
  pad_B = p - lengths_B
  idx_P = jnp.arange(p)
  pos_BxP = jnp.maximum(idx_P[None] - pad_B[:, None], 0).astype(jnp.int32)
  seg_BxP = (idx_P[None] >= pad_B[:, None]).astype(jnp.int32)
  # Per-layer weights and cache buffers: the decode step reads and updates
  # them in place (no per-step slicing or copying of stacked arrays).
  params = split_layers(params)
  kv_shape = (b, cfg.n_kv_heads, s, cfg.head_dim)
  zeros = lambda: [jnp.zeros(kv_shape, dtype) for _ in range(cfg.n_layers)]
  cache = {
      "k": zeros(), "v": zeros(),
      "pos": jnp.zeros((b, s), jnp.int32),
      "seg": jnp.zeros((b, s), jnp.int32),  # 0: empty slot.
      "slot": jnp.int32(0),
  }

  def logits_of(params, adapters, tokens, pos, seg, cache, attend_cache=True):
    h, cache = decode(cfg, params, tokens, pos, seg, adapters=adapters,
                      seam=seam, cache=cache, attend_cache=attend_cache)
    return logits_from_hidden(cfg, params, h[:, -1], adapters=adapters,
                              seam=seam), cache

  # Prefill only writes the (empty) cache; decode steps read it.
  logits, cache = logits_of(params, adapters, tokens_BxP, pos_BxP, seg_BxP,
                            cache, False)
  if num_samples > 1:  # Each prompt's cache row serves its G samples.
    rep = lambda x: jnp.repeat(x, num_samples, axis=0) if x.ndim else x
    logits, cache, lengths_B = jax.tree.map(rep, (logits, cache, lengths_B))
    b *= num_samples
  cache = {**cache, "k": _loop_layout(cfg, cache["k"], offset),
           "v": _loop_layout(cfg, cache["v"], offset)}
  eos = jnp.asarray(eos_ids, jnp.int32)

  def cond(state):
    t, _, _, done, *_ = state
    return (t < max_new) & ~jnp.all(done)

  def body(state):
    t, logits, cache, done, out_tok, out_logp, n_B, rng = state
    rng, key = jax.random.split(rng)
    tok_B = _sample(logits, key, temperature, top_k, top_p)
    logp_B = (jnp.take_along_axis(logits, tok_B[:, None], axis=-1)[:, 0]
              - jax.nn.logsumexp(logits, axis=-1))
    tok_B = jnp.where(done, cfg.pad_id, tok_B)
    out_tok = out_tok.at[:, t].set(tok_B)
    out_logp = out_logp.at[:, t].set(jnp.where(done, 0.0, logp_B))
    n_B = n_B + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok_B, eos)
    # Feed the new token (cache slot p + t) at position prompt length + t.
    pos_B = (lengths_B + t).astype(jnp.int32)
    logits, cache = logits_of(params, adapters, tok_B[:, None],
                              pos_B[:, None], jnp.ones((b, 1), jnp.int32),
                              cache)
    return t + 1, logits, cache, done, out_tok, out_logp, n_B, rng

  state = (jnp.int32(0), logits, cache, jnp.zeros((b,), bool),
           jnp.full((b, max_new), cfg.pad_id, jnp.int32),
           jnp.zeros((b, max_new), jnp.float32), jnp.zeros((b,), jnp.int32),
           rng)
  _, _, _, _, out_tok, out_logp, n_B, _ = jax.lax.while_loop(cond, body,
                                                              state)
  return GenerateOutput(out_tok, out_logp, n_B)


def _left_pad(prompts, lengths, pad_id: int):
  """(tokens [B, P] left-padded, lengths [B]) from lists or a padded array."""
  if lengths is None:
    rows = [list(map(int, r)) for r in prompts]
  else:  # Right-padded array + lengths.
    arr = np.asarray(prompts)
    rows = [list(arr[i, :int(n)]) for i, n in enumerate(np.asarray(lengths))]
  if not rows or min(len(r) for r in rows) == 0:
    raise errors.TunejaxError("generate: every prompt needs >= 1 token")
  p = -(-max(len(r) for r in rows) // _BUCKET) * _BUCKET
  out = np.full((len(rows), p), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, p - len(r):] = r
  return out, np.array([len(r) for r in rows], np.int32)


def generate(cfg: ModelConfig, params: dict, prompts, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng: jax.Array | None = None, *,
             eos_id: int | Sequence[int] | None = None, adapters=None,
             seam: Seam | None = None, lengths=None,
             num_samples: int = 1) -> GenerateOutput:
  """Samples `max_new_tokens` continuations of a batch of prompts.

  Args:
    cfg, params: the model; params may be `split_layers(params)` (then the
      call copies no layer weights: split a frozen base once for many
      rollouts).
    prompts: a list of token-id lists, or a right-padded [B, P] array with
      `lengths` [B].
    max_new_tokens: number of new tokens T.
    temperature: 0 means greedy.
    top_k, top_p: optional truncation of the sampling distribution.
    rng: PRNG key for sampling (default key 0).
    eos_id: id(s) that stop a row (default `cfg.eos_id`); the EOS is kept.
    adapters, seam: PEFT seam and adapter leaves (see `transformer.hidden`).
    lengths: prompt lengths when `prompts` is a padded array.
    num_samples: G continuations per prompt (e.g. a GRPO group). Each
      prompt is prefilled once; output rows i·G .. i·G + G - 1 are prompt
      i's samples.

  Returns:
    GenerateOutput(tokens_BxT, logps_BxT, lengths_B), B = prompts x G.
  """
  tokens, lens = _left_pad(prompts, lengths, cfg.pad_id)
  if eos_id is None:
    eos_id = cfg.eos_id
  eos_ids = tuple(int(e) for e in np.atleast_1d(eos_id))
  rng = jax.random.key(0) if rng is None else rng
  if int(num_samples) < 1:
    raise errors.TunejaxError(f"generate: num_samples={num_samples} must be "
                              ">= 1")
  return _generate(cfg, seam or DEFAULT_SEAM, int(max_new_tokens),
                   float(temperature), top_k, top_p, eos_ids,
                   int(num_samples), params,
                   adapters or {}, jnp.asarray(tokens), jnp.asarray(lens),
                   rng)
