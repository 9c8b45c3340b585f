"""Parameter masks for sparse fine-tuning, as flat index sets.

A mask over one weight matrix `W [..., in, out]` is `k` int32 flat
(row-major) indices per matrix, `[..., k]`, sorted ascending; leading dims
(the layer axis of stacked kernels) select independently. The builders:

  random     k entries uniformly without replacement (SpIEL's initial set).
  magnitude  top-k |W|.
  lift       top-k |W_f|, W_f the rank-f SVD approximation of W (LIFT, Liu
             et al. 2025; zihanghliu/LIFT: k = min((in + out)·r, in·out)).
  fisher     top-k Σ_b (∂L_b/∂W)², squared gradients summed over batches
             (the diagonal empirical Fisher; scores come from the caller).
  lt_sft     top-k |θ1 − θ0| after full fine-tuning (LT-SFT, Ansell et al.
             2022; cambridgeltl/composable-sft), per matrix or with one
             global threshold (`global_topk`).

Module selection is regex over module paths (`target_modules`); BitFit is
the 'freeze' method with `peft.trainable = bitfit_trainable()`; layer-wise
learning-rate decay and freezing of the lower layers is `layerwise_scale`
(`config.optim.layer_lr_decay`, `config.optim.freeze_layers`).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tunejax import errors, tree


def target_modules(names: Sequence[str], patterns: Sequence[str],
                   what: str = "config.peft.targets") -> list[str]:
  """Module paths (kernel names without '/kernel') matched by `patterns`.

  A pattern that matches no module is an error (almost always a typo).
  """
  modules = [n[: -len("/kernel")] for n in names if n.endswith("/kernel")]
  for pat in patterns:
    if not any(re.fullmatch(pat, m) for m in modules):
      raise errors.ConfigError(
          f"{what}: '{pat}' matches no module (modules: "
          f"{sorted(set(modules))})")
  return [m for m in modules if any(re.fullmatch(p, m) for p in patterns)]


def bitfit_trainable() -> tuple[str, ...]:
  """`peft.trainable` for BitFit (Ben Zaken et al. 2022): biases only."""
  return (r".*/bias",)


def budget(d_in: int, d_out: int, *, k: int = 0, match_rank: int = 0,
           density: float = 0.01) -> int:
  """Entries per matrix: `k`, else LoRA-r's count r·(in + out), else
  ceil(density · in · out); at most in · out."""
  if k:
    n = k
  elif match_rank:
    n = match_rank * (d_in + d_out)
  else:
    n = math.ceil(density * d_in * d_out)
  return max(1, min(int(n), d_in * d_out))


def topk_indices(score: jax.Array, k: int) -> jax.Array:
  """Sorted int32 flat indices of the k largest entries of each matrix.

  score: [..., in, out] -> [..., k].
  """
  flat = score.reshape(*score.shape[:-2], -1)
  _, idx = jax.lax.top_k(flat, k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def random_indices(key: jax.Array, shape: Sequence[int], k: int) -> jax.Array:
  """k distinct uniformly random flat indices per matrix (top-k of noise,
  as SpIEL's initial set)."""
  return topk_indices(jax.random.uniform(key, tuple(shape)), k)


def magnitude_indices(w: jax.Array, k: int) -> jax.Array:
  return topk_indices(jnp.abs(w.astype(jnp.float32)), k)


def low_rank(w: jax.Array, rank: int) -> jax.Array:
  """The rank-`rank` truncated-SVD approximation U_f diag(S_f) V_fᵀ."""
  u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  f = min(rank, s.shape[-1])
  return jnp.matmul(u[..., :f] * s[..., None, :f], vt[..., :f, :])


def lift_indices(w: jax.Array, k: int, rank: int) -> jax.Array:
  """LIFT's principal weights: top-k |W_f| of the rank-f approximation."""
  return topk_indices(jnp.abs(low_rank(w, rank)), k)


def delta_indices(theta0: jax.Array, theta1: jax.Array, k: int) -> jax.Array:
  """LT-SFT per-matrix selection: top-k |θ1 − θ0|."""
  d = theta1.astype(jnp.float32) - theta0.astype(jnp.float32)
  return topk_indices(jnp.abs(d), k)


def global_topk(scores: dict[str, np.ndarray], total: int
                ) -> dict[str, np.ndarray]:
  """One global top-`total` over all matrices (LT-SFT's global ranking).

  Returns {name: bool array of the score's shape}. Ties at the threshold
  are broken by position so exactly `total` entries are selected.
  """
  names = list(scores)
  flat = np.concatenate([np.abs(np.asarray(scores[n], np.float64)).ravel()
                         for n in names])
  total = min(total, flat.size)
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:total]] = True
  out, off = {}, 0
  for n in names:
    size = np.asarray(scores[n]).size
    out[n] = keep[off: off + size].reshape(np.shape(scores[n]))
    off += size
  return out


def dense_mask(indices: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The bool [..., in, out] mask of flat `indices` [..., k]."""
  *lead, d_in, d_out = shape
  flat = jnp.zeros((*lead, d_in * d_out), bool)
  if lead:
    flat = jax.vmap(lambda f, i: f.at[i].set(True))(
        flat.reshape(-1, d_in * d_out), indices.reshape(-1, indices.shape[-1]))
  else:
    flat = flat.at[indices].set(True)
  return flat.reshape(tuple(shape))


def layer_scales(n_layers: int, decay: float, n_frozen: int) -> np.ndarray:
  """Per-layer update scale: decay^(L−1−ℓ) for layer ℓ (top layer 1), 0
  for the first `n_frozen` layers."""
  s = decay ** (n_layers - 1 - np.arange(n_layers, dtype=np.float64))
  s[:n_frozen] = 0.0
  return s.astype(np.float32)


def layerwise_scale(decay: float = 1.0, n_frozen: int = 0
                    ) -> optax.GradientTransformation:
  """Layer-wise learning-rate decay and freezing of layer-stacked params.

  Regex lr groups cannot reach single layers of a stacked [n_layers, ...]
  leaf, so this scales updates per layer instead (append it after the
  learning rate; being linear, it equals per-layer learning rates):
  layer ℓ of L gets decay^(L−1−ℓ) (layer-wise LR decay as in ELECTRA, Clark
  et al. 2020, and the biomedical fine-tuning study), embeddings decay^L,
  the final norm and head 1. `n_frozen` > 0 freezes the embeddings and the
  first `n_frozen` layers (their updates are exactly zero).
  """
  def scales(updates):
    flat = tree.flatten(updates)
    stacked = [x for n, x in flat.items() if n.startswith("layers/")]
    n_layers = stacked[0].shape[0] if stacked else 0

    def one(name, x):
      if name.startswith("layers/"):
        s = layer_scales(n_layers, decay, n_frozen)
        return x * s.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
      if name.startswith("embed/"):
        return x * (0.0 if n_frozen else decay ** n_layers)
      return x
    return tree.map_with_names(one, updates)

  return optax.GradientTransformation(
      lambda _: optax.EmptyState(),
      lambda u, state, params=None: (scales(u), state))
