"""Layer-input statistics for data-driven inits (EVA, CorDA).

A capture seam runs the plain base model and, for every targeted linear,
returns a side output (see `tunejax.models.seam`) with the Gram matrix of
the linear's masked input tokens; `collect` sums these over calibration
batches in one jitted function. Only d_in x d_in per matrix is kept, never
the activations themselves.

Why a Gram matrix is enough. EVA (Paischer et al. 2024, arXiv 2410.07170)
takes the top right-singular vectors of the centred input matrix X_c
(n tokens x d_in); PEFT computes them by incremental PCA over batches
(`peft/tuners/lora/eva.py`, `utils/incremental_pca.py`). With
G = Σ xᵀx, μ = Σ x / n, the centred scatter X_cᵀX_c = G − n μ μᵀ = V S² Vᵀ,
so its eigenvectors are exactly those right-singular vectors and its
eigenvalues the squared singular values; summing G, Σ x and n over batches
is the PCA of all calibration tokens at once. Incremental PCA equals it when
it keeps every component (Ross et al. 2008) and approximates it when it
truncates to k components between batches, as PEFT does.

CorDA (Yang et al. 2024, arXiv 2406.05223; PEFT `lora/corda.py`
`calib_cov_distribution`) uses C = (1/N) Σ_samples X̃ᵀX̃ with each sample's
activations divided by |max(X)| (PEFT's and the official repository's
normalisation; a sample is one sequence there, one batch row here).

Masking: padding (segment id 0) never counts; with `label_mask`, only
tokens whose next-token target is in the loss (`loss_mask`) count, PEFT's
`use_label_mask` (HF masks the label at the token itself, one position
later than tunejax's loss mask).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp

from tunejax import errors, models, tree
from tunejax.models.seam import Seam

MASK = "calib_mask"  # the adapters leaf that marks a captured linear
MODES = ("scatter", "corda")


@dataclasses.dataclass(frozen=True)
class CaptureSeam(Seam):
  """Plain linears; those with a `calib_mask` adapter [B, L] also return
  {'gram': [in, in], 'sum': [in], 'count': []} over their masked input.

  mode 'scatter': plain sums over tokens (count = tokens). mode 'corda':
  each row's tokens scaled by 1 / |max of the row's activations| before
  the Gram (count = rows with any token; 'sum' is zero).
  """
  mode: str = "scatter"

  def linear(self, name, x, kernel, bias, adapters):
    y = super().linear(name, x, kernel, bias, {})
    if MASK not in adapters:
      return y
    m_BxL = adapters[MASK].astype(jnp.float32)
    x_BxLxD = x.astype(jnp.float32)
    if self.mode == "corda":
      big = jnp.where(m_BxL[..., None] > 0, x_BxLxD, -jnp.inf)
      top_B = jnp.abs(jnp.max(big, axis=(1, 2)))
      has_B = jnp.any(m_BxL > 0, axis=1)
      scale_B = jnp.where(has_B, 1.0 / jnp.where(has_B, top_B, 1.0), 0.0)
      w_BxL = m_BxL * jnp.square(scale_B)[:, None]
      count = jnp.sum(has_B.astype(jnp.float32))
    else:
      w_BxL = m_BxL
      count = jnp.sum(m_BxL)
    x_NxD = x_BxLxD.reshape(-1, x.shape[-1])
    w_N = w_BxL.reshape(-1)
    gram = jnp.dot((x_NxD * w_N[:, None]).T, x_NxD,
                   precision=jax.lax.Precision.HIGHEST)
    total = (jnp.zeros(x.shape[-1]) if self.mode == "corda"
             else jnp.dot(w_N, x_NxD, precision=jax.lax.Precision.HIGHEST))
    return y, {"gram": gram, "sum": total, "count": count}


def token_mask(batch, label_mask: bool):
  """[B, L] float: real tokens (segment id > 0), and in the loss if asked."""
  m = batch["segment_ids"] > 0
  if label_mask and "loss_mask" in batch:
    m = m & (batch["loss_mask"] > 0)
  return m.astype(jnp.float32)


def _capture_adapters(model_cfg, modules, mask_BxL):
  flat = {f"{m}/{MASK}": jnp.broadcast_to(
      mask_BxL, (model_cfg.n_layers, *mask_BxL.shape)) for m in modules}
  return tree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _batch_stats(model_cfg, modules: tuple[str, ...], mode: str,
                 label_mask: bool, params, batch):
  mask = token_mask(batch, label_mask)
  _, aux = models.hidden(
      model_cfg, params, batch["tokens"], batch.get("positions"),
      batch.get("segment_ids"), seam=CaptureSeam(mode),
      adapters=_capture_adapters(model_cfg, modules, mask), return_aux=True)
  out = {}
  for m in modules:
    short = m[len("layers/"):]
    out[m] = {k: aux[f"{short}/{k}"] for k in ("gram", "sum", "count")}
  return out


def check_modules(modules: Iterable[str]) -> tuple[str, ...]:
  """Data-driven inits capture layer-stack linears only (side outputs are
  collected inside the layer stack)."""
  modules = tuple(sorted(modules))
  for m in modules:
    if not m.startswith("layers/"):
      raise errors.ConfigError(
          f"config.peft.targets: '{m}' is outside the layer stack; data-"
          "driven inits (eva, corda) adapt layer linears only")
  return modules


def collect(model_cfg, params, batches: Iterable[dict], modules,
            mode: str = "scatter", label_mask: bool = False) -> dict:
  """{module: {'gram' [n_layers, in, in], 'sum' [n_layers, in],
  'count' [n_layers]}} summed over `batches` (float32).

  `params` are the plain base model's; `modules` are layer-stack module
  paths such as 'layers/attn/q'. Batches are (global) arrays with 'tokens',
  'segment_ids' and optionally 'positions', 'loss_mask'.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  modules = check_modules(modules)
  acc = None
  for batch in batches:
    st = _batch_stats(model_cfg, modules, mode, label_mask, params,
                      {k: v for k, v in batch.items() if k in (
                          "tokens", "positions", "segment_ids",
                          "loss_mask")})
    acc = st if acc is None else jax.tree.map(jnp.add, acc, st)
  if acc is None:
    raise errors.ConfigError("config.peft.calib_batches: no calibration "
                             "batches were read (must be >= 1)")
  return acc
