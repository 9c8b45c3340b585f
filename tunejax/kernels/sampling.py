"""Gumbel-top-k sampling of K candidate tokens per position, fused.

Adding iid Gumbel(0, 1) noise to the scaled logits and keeping the K
largest draws K distinct tokens, without replacement, from softmax(s)
(Kool et al., 2019, "Stochastic Beams and Where to Find Them"). Streaming
over vocabulary tiles keeps a running top-K of the perturbed scores and a
running logsumexp, so `[N, V]` logits never exist. One-Token Rollout draws
its candidates with it (from a tempered copy of the current policy).
"""
import jax
import jax.numpy as jnp

from tunejax.kernels import _tiles
from tunejax.kernels import _xla


def sample_candidates(h_NxD, w_DxV, rng, k, *, temperature=1.0, softcap=None,
                      block_n=None, block_v=None):
  """K distinct tokens per position from softmax(softcap(h @ w) / T).

  Args:
    h_NxD: hidden states.
    w_DxV: unembedding (V >= k).
    rng: a PRNG key; the draw depends on it and on the block sizes.
    k: candidates per position.
    temperature, softcap: define the sampling distribution.
    block_n, block_v: tile sizes (default: `_xla.default_blocks()`).

  Returns:
    ids_NxK (int32, in order of decreasing perturbed score) and logp_NxK,
    their float32 log-probs under the sampling distribution (constants: no
    gradient flows; take differentiable policy log-probs from token_stats).
  """
  sc = _tiles.Scaling(None if softcap is None else float(softcap),
                      float(temperature))
  h_NxD, w_DxV = _tiles.common_dtype(*jax.lax.stop_gradient((h_NxD, w_DxV)))
  row_ids = jnp.arange(h_NxD.shape[0], dtype=jnp.int32)[:, None]

  def init(rows):
    st = _tiles.init_stats(rows)
    return (st.m, st.l, jnp.full((rows, k), -jnp.inf, jnp.float32),
            jnp.zeros((rows, k), jnp.float32), jnp.zeros((rows, k), jnp.int32))

  def fold(carry, z, cols, col_ok, rows, _):
    m, l, top, top_s, top_ids = carry
    s = _tiles.scale_logits(z[0], sc)
    m, scale, _, e = _tiles.online_max(m, s, col_ok)
    l = l * scale + jnp.sum(e, axis=1, keepdims=True)
    # Noise keyed by the tile origin (first row, first column).
    key = jax.random.fold_in(jax.random.fold_in(rng, rows[0][0, 0]),
                             cols[0, 0])
    score = jnp.where(col_ok, s + jax.random.gumbel(key, s.shape), -jnp.inf)
    both = jnp.concatenate([top, score], axis=1)
    top, pick = jax.lax.top_k(both, k)
    cols_b = jnp.broadcast_to(cols, s.shape)
    top_s = jnp.take_along_axis(jnp.concatenate([top_s, s], axis=1), pick, 1)
    top_ids = jnp.take_along_axis(
        jnp.concatenate([top_ids, cols_b], axis=1), pick, 1)
    return m, l, top, top_s, top_ids

  def finish(carry, rows):
    del rows
    m, l, _, top_s, top_ids = carry
    return top_ids, top_s - (m + jnp.log(l))

  default_n, default_v = _xla.default_blocks(w_DxV.dtype)
  return _xla.forward(((h_NxD, w_DxV),), (row_ids,), init, fold, finish,
                      block_n=block_n or default_n,
                      block_v=block_v or default_v)
