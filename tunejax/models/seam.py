"""The one PEFT seam: every linear, embedding and hook point of the model.

The model calls these methods and never knows which PEFT method is active.
A method (LoRA, DoRA, sparse deltas, IA3, ...) subclasses `Seam` and
overrides what it changes. Seams are frozen dataclasses so they hash and can
be static jit arguments.

`adapters` is always this module's dict of adapter leaves for the current
layer (layer-stacked leaves already sliced), or `{}` when it has none. The
adapters tree passed to `hidden/forward/generate` mirrors the params tree:
  linear 'layers/attn/q'  <- adapters['layers']['attn']['q']
  linear 'lm_head'        <- adapters['lm_head'] (also when embeddings are
                             tied; the kernel is then the embedding.T)
  embed                   <- adapters['embed']
  act 'attn/k', 'attn/v'  <- adapters['layers']['attn']['k' | 'v'] (the same
                             dict as the k / v linear)
  act 'attn/heads'        <- adapters['layers']['attn']['heads']
  act 'mlp/hidden'        <- adapters['layers']['mlp']['hidden']
Leaves under 'layers' carry a leading n_layers axis.

Virtual tokens (the prompt family, see `prompt`, `prefix` and
`position_offset`):
  prompt                  <- adapters['prompt']: input-embedding hook; may
                             update the token embeddings (DePT) and return
                             [N, D] soft-prompt embeddings that the model
                             prepends to every row (virtual tokens).
  prefix                  <- the whole adapters tree: per-layer key/value
                             prefixes [n_layers, P, G·K] (prefix tuning),
                             one extra attention block in every layer.
  position_offset         <- the whole adapters tree: real tokens' positions
                             are shifted by it; the N (or P) virtual tokens
                             take the positions just before, so a prompt
                             reads "prompt, then text" exactly as in HF/PEFT.
Virtual keys are shared: every non-padding query attends to them (negative
key segment ids, see `layers.attention_mask`), so under packing each
document sees the prompt exactly as if it ran alone. The model returns
hidden states for the real tokens only, so losses need no change.

Side outputs: inside the layer stack, `linear` and `act` may return
`(y, {key: array})` instead of `y`; the model collects these per layer as
'<module>/<key>' (e.g. 'mlp/gate/balance'), stacks them over layers and
returns them from `hidden(..., return_aux=True)`. Router balance losses and
activation statistics for data-driven initialisations use this channel.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Activation hook points passed to `Seam.act`.
ACT_POINTS = ("attn/k", "attn/v", "attn/heads", "mlp/hidden")


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` over the last axis, as one 2-D GEMM.

  Flattening the leading [B, L] dims first matters on XLA:CPU: the weight
  gradient of a 3-D dot_general (contracting two batch dims) runs ~2x
  slower than the same 2-D GEMM (measured: MLP fwd+bwd 0.60 s -> 0.32 s).
  A narrow weight (out < in: LoRA's A, k/v projections) takes its gradient
  through `xt_g` there.
  """
  x2 = x.reshape(-1, x.shape[-1])
  narrow = w.shape[-1] < w.shape[0] and jax.default_backend() == "cpu"
  y = _narrow_gemm(x2, w) if narrow else jnp.dot(x2, w)
  return y.reshape(*x.shape[:-1], w.shape[-1])


def xt_g(x_NxI: jax.Array, g_NxO: jax.Array) -> jax.Array:
  """xᵀg [I, O] (a weight's gradient). On a CPU with O < I it runs as
  (gᵀx)ᵀ: XLA:CPU computes xᵀg with a narrow [I, O] output ~6x slower than
  the same product as [O, I] (LoRA's A at I=512, r=16: 3.5 vs 0.5 ms;
  1536: 10 vs 1.8 ms), and the barrier keeps it from folding the transpose
  back into the dot."""
  if g_NxO.shape[-1] < x_NxI.shape[-1] and jax.default_backend() == "cpu":
    return jax.lax.optimization_barrier(jnp.dot(g_NxO.T, x_NxI)).T
  return jnp.dot(x_NxI.T, g_NxO)


@jax.custom_vjp
def _narrow_gemm(x_NxI, w_IxO):
  return jnp.dot(x_NxI, w_IxO)


def _narrow_fwd(x_NxI, w_IxO):
  return jnp.dot(x_NxI, w_IxO), (x_NxI, w_IxO)


def _narrow_bwd(res, g_NxO):
  x_NxI, w_IxO = res
  dx = jnp.dot(g_NxO, w_IxO.T).astype(x_NxI.dtype)
  return dx, xt_g(x_NxI, g_NxO).astype(w_IxO.dtype)


_narrow_gemm.defvjp(_narrow_fwd, _narrow_bwd)


@dataclasses.dataclass(frozen=True)
class Seam:
  """Plain computation; PEFT methods override some of these methods."""

  def linear(self, name: str, x: jax.Array, kernel: jax.Array,
             bias: jax.Array | None, adapters: dict) -> jax.Array:
    """`x @ kernel (+ bias)`.

    Args:
      name: module path without the layer index, e.g. 'layers/attn/q'.
      x: [..., in] activations, already in the compute dtype.
      kernel: [in, out] weight in the param dtype.
      bias: [out] or None.
      adapters: this module's adapter leaves for the current layer.

    Returns:
      [..., out] in x's dtype.
    """
    del name, adapters
    y = matmul(x, kernel.astype(x.dtype))
    return y if bias is None else y + bias.astype(x.dtype)

  def embed(self, tokens_BxL: jax.Array, table_VxD: jax.Array,
            adapters: dict) -> jax.Array:
    """Embedding lookup `table[tokens]` (before any embedding scale)."""
    del adapters
    return jnp.take(table_VxD, tokens_BxL, axis=0)

  def act(self, name: str, x: jax.Array, adapters: dict) -> jax.Array:
    """Identity hook at the activation points in `ACT_POINTS`.

    Shapes: 'attn/k', 'attn/v' [B, L, G, K]; 'attn/heads' [B, L, H, K];
    'mlp/hidden' [B, L, F].
    """
    del name, adapters
    return x

  def prompt(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
             adapters: dict) -> tuple[jax.Array, jax.Array | None]:
    """Input-embedding hook, after the lookup, before any embedding scale.

    Args:
      x_BxLxD: token embeddings (table dtype).
      positions_BxL: the tokens' positions (before `position_offset`).
      adapters: adapters['prompt'] ({} when absent).

    Returns:
      (x_BxLxD, None or [N, D] virtual-token embeddings prepended to every
      row at the start of a sequence, i.e. without a KV cache or at
      prefill).
    """
    del positions_BxL, adapters
    return x_BxLxD, None

  def prefix(self, adapters: dict) -> tuple[jax.Array, jax.Array] | None:
    """None or per-layer (k, v) prefixes, each [n_layers, P, G·K] (heads
    split like the k / v projections), used as given: after RoPE and any
    k-norm, like HF past_key_values."""
    del adapters
    return None

  def position_offset(self, adapters: dict) -> int:
    """Static shift of the real tokens' positions (>= the number of virtual
    tokens; `generate` sizes its KV cache with it)."""
    del adapters
    return 0


DEFAULT_SEAM = Seam()


def virtual_positions(offset: int, n: int, b: int) -> jax.Array:
  """[B, N]: virtual tokens take the N positions just before the text's."""
  return jnp.broadcast_to(jnp.arange(offset - n, offset, dtype=jnp.int32),
                          (b, n))


def prepend_virtual(virtual_NxD, x_BxLxD, positions_BxL, segment_ids_BxL,
                    offset: int):
  """Prepends shared virtual tokens (segment id -1) to every row."""
  b, n = x_BxLxD.shape[0], virtual_NxD.shape[0]
  v = jnp.broadcast_to(virtual_NxD.astype(x_BxLxD.dtype)[None],
                       (b, *virtual_NxD.shape))
  return (jnp.concatenate([v, x_BxLxD], axis=1),
          jnp.concatenate([virtual_positions(offset, n, b),
                           positions_BxL.astype(jnp.int32)], axis=1),
          jnp.concatenate([jnp.full((b, n), -1, segment_ids_BxL.dtype),
                           segment_ids_BxL], axis=1))
