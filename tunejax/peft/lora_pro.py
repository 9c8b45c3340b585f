"""LoRA-Pro: correct the A/B gradients so the equivalent low-rank update
best approximates the full-weight gradient.

Wang et al. 2024, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?"
(arXiv 2407.18242, Theorems 2.1/2.2); checked against the official code
(github.com/mrflogs/LoRA-Pro, `peta/optim.py`, `AdamW.step_efficient`).

Paper layout (W out×in, B out×r, A r×in, W = W0 + s·B A): LoRA's gradients
are g_A = s·Bᵀ G and g_B = s·G Aᵀ, and a step (ĝ_A, ĝ_B) moves W by the
equivalent gradient g̃ = s(B ĝ_A + ĝ_B A). The ĝ minimising ‖g̃ − G‖_F:

    ĝ_A = (1/s²)(BᵀB)⁻¹ g_A + X A
    ĝ_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B X

for any r×r X (g̃ is the orthogonal projection of G onto the tangent space
of rank-r matrices at BA: P_B G + (I − P_B) G P_A). `x_mode` picks X as the
official code does: 'sylvester' (default; the ĝ closest to (g_A, g_B),
solving BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ), 'zero', or 'symmetry'
(X = −½(1/s²)(BᵀB)⁻¹ Bᵀ g_B AAᵀ). Inverses are pseudo-inverses of
M + 1e-8·I, as in the code, so B = 0 at init is well defined.

Interaction with Adam: this is the code's "efficient" mode (the mode its
released training script uses): correct the raw gradients, then run the
ordinary optimizer on ĝ_A, ĝ_B. The paper's Algorithm with Adam moments of
the full-size equivalent gradient ("full" mode, out×in state per module) is
not implemented.

tunejax layout is the transpose (A [in, r], B [r, out], kernel [in, out]);
the functions below transpose to the paper's layout and back, and batch
over leading (layer-stack) axes.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from tunejax import errors, tree

X_MODES = ("sylvester", "zero", "symmetry")
_DELTA = 1e-8


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def _eye(r, dtype):
  return jnp.eye(r, dtype=dtype)


def solve_sylvester_psd(p_RxR, q_RxR, c_RxR):
  """X with P X + X Q = C for symmetric PSD P, Q (here BᵀB and AAᵀ).

  Eigen-decomposes both (P = U Λ Uᵀ, Q = V M Vᵀ), so X = U [F / (λ_i +
  μ_j)] Vᵀ with F = Uᵀ C V. Entries with λ_i + μ_j = 0 (both Gram matrices
  singular in a shared direction) are set to 0: the minimum-norm choice.
  """
  lam, u = jnp.linalg.eigh(p_RxR)
  mu, v = jnp.linalg.eigh(q_RxR)
  f = _t(u) @ c_RxR @ v
  den = lam[..., :, None] + mu[..., None, :]
  safe = jnp.abs(den) > 1e-30
  y = jnp.where(safe, f / jnp.where(safe, den, 1.0), 0.0)
  return u @ y @ _t(v)


def correct_paper(a_RxI, b_OxR, ga_RxI, gb_OxR, s: float,
                  x_mode: str = "sylvester"):
  """(ĝ_A, ĝ_B) in the paper's layout (all float32; leading axes batch)."""
  r = a_RxI.shape[-2]
  eye = _eye(r, a_RxI.dtype)
  aat = a_RxI @ _t(a_RxI)
  btb = _t(b_OxR) @ b_OxR
  aat_inv = jnp.linalg.pinv(aat + _DELTA * eye)
  btb_inv = jnp.linalg.pinv(btb + _DELTA * eye)
  inv_s2 = 1.0 / (s * s)
  if x_mode == "sylvester":
    x = solve_sylvester_psd(btb, aat, -inv_s2 * btb_inv @ ga_RxI @ _t(a_RxI))
  elif x_mode == "symmetry":
    x = -0.5 * inv_s2 * btb_inv @ _t(b_OxR) @ gb_OxR @ aat
  else:
    x = jnp.zeros_like(aat)
  ga = inv_s2 * btb_inv @ ga_RxI + x @ a_RxI
  # (I − B (BᵀB)⁻¹ Bᵀ) g_B without forming the out×out projector.
  gb_perp = gb_OxR - b_OxR @ (btb_inv @ (_t(b_OxR) @ gb_OxR))
  gb = inv_s2 * gb_perp @ aat_inv - b_OxR @ x
  return ga, gb


def correct(a_IxR, b_RxO, ga_IxR, gb_RxO, s: float,
            x_mode: str = "sylvester"):
  """LoRA-Pro gradients in tunejax's layout, in the gradients' dtype."""
  f32 = lambda z: _t(z.astype(jnp.float32))
  ga, gb = correct_paper(f32(a_IxR), f32(b_RxO), f32(ga_IxR), f32(gb_RxO), s,
                         x_mode)
  return _t(ga).astype(ga_IxR.dtype), _t(gb).astype(gb_RxO.dtype)


def lora_pro(scales: dict[str, float], x_mode: str = "sylvester"
             ) -> optax.GradientTransformation:
  """An optax transformation replacing each LoRA pair's gradients.

  Args:
    scales: {module path: s} of the adapted modules (e.g. 'layers/attn/q'
      for leaves 'layers/attn/q/lora_a' and '.../lora_b'), from
      `Method.lora_scales()`.
    x_mode: 'sylvester' | 'zero' | 'symmetry' (see the module docstring).

  Place it before the optimizer's moment estimates (after clipping, as the
  official trainer clips raw gradients). Needs `params` in `update`.
  Other leaves pass through unchanged; it keeps no state.
  """
  if x_mode not in X_MODES:
    raise errors.ConfigError(
        f"config.optim.lora_pro: unknown X mode '{x_mode}' (known: "
        f"{list(X_MODES)})")
  if not scales:
    raise errors.ConfigError(
        "config.optim.lora_pro: needs a LoRA-family peft.method with "
        "lora_a/lora_b adapters (e.g. 'lora', 'rslora', 'pissa')")

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("lora_pro needs params in update()")
    g, p = tree.flatten(updates), tree.flatten(params)
    for m, s in scales.items():
      ka, kb = m + "/lora_a", m + "/lora_b"
      if ka in g and kb in g:
        g[ka], g[kb] = correct(p[ka], p[kb], g[ka], g[kb], s, x_mode)
    return tree.unflatten(g), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
