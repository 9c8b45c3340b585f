"""KaSA: knowledge-aware singular-value adaptation.

Wang et al. 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large
Language Models" (arXiv 2412.06071); official code juyongjiang/KaSA and
PEFT's `KasaLinearVariant` (`peft/tuners/lora/variants.py`), as checked in
reference/verified-formulas.md §5:

    W = U S Vᵀ; frozen base W' = U_k S_k V_kᵀ with k = min(in, out) − r
    (the r smallest singular components are dropped, once, at init);
    y = x W' + s · ((x A) ⊙ d) B,   s = alpha / r,
    A [in, r] Kaiming-uniform, B [r, out] zero, d [r] ~ N(0, 1).

The loss gets L_aux = reduce over adapted matrices of
β·‖d‖² + γ·(‖G_A − I‖_F + ‖G_B − I‖_F) (plain, not squared, Frobenius
norms as in both codes). `kasa_orth='rank'`: G_A = AᵀA, G_B = B Bᵀ (r x r,
the paper's semi-orthogonality and PEFT's form); 'full': G_A = A Aᵀ
(in x in), G_B = BᵀB (out x out), the official code's form (the same
minimiser; its norm is sqrt(‖·‖²_rank + in − r)). `kasa_reduce`: 'mean'
(official code, the scale its β = 1e-4, γ = 1e-3 were tuned at) or 'sum'
(PEFT's `_get_kasa_loss`).

How the regulariser reaches the loss: the seam computes each layer's term
from that layer's adapters and returns it as a side output ('kasa_reg');
`aux_loss` reduces the stacked side outputs into the penalty the step adds
to the mean token loss (the `Method.aux_loss` contract), so the gradient of
the penalty flows to A, B and d through the same forward.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tunejax import errors, sharding, tree
from tunejax.peft import lowrank
from tunejax.peft.base import PeftConfig, register
from tunejax.peft.lora import Lora, LoraSeam

REG = "kasa_reg"


def truncate(w_IxO, r: int):
  """(W' = W without its r smallest singular components, dropped part),
  both float32. `r` must be < min(in, out)."""
  w = sharding.constrain(w_IxO.astype(jnp.float32), (None,) * w_IxO.ndim)
  u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
  k = sv.shape[-1] - r
  keep = (u[..., :, :k] * sv[..., None, :k]) @ vt[..., :k, :]
  return keep, w - keep


def regulariser(a_IxR, b_RxO, d_R, *, beta: float, gamma: float,
                orth: str = "rank"):
  """β·‖d‖² + γ·(‖G_A − I‖_F + ‖G_B − I‖_F) for one matrix (float32)."""
  a, b, d = (x.astype(jnp.float32) for x in (a_IxR, b_RxO, d_R))
  hi = jax.lax.Precision.HIGHEST
  if orth == "rank":
    g_a = jnp.matmul(a.T, a, precision=hi)
    g_b = jnp.matmul(b, b.T, precision=hi)
  else:
    g_a = jnp.matmul(a, a.T, precision=hi)
    g_b = jnp.matmul(b.T, b, precision=hi)
  off = lambda g: jnp.sqrt(jnp.sum(jnp.square(g - jnp.eye(g.shape[0]))))
  return beta * jnp.sum(jnp.square(d)) + gamma * (off(g_a) + off(g_b))


@dataclasses.dataclass(frozen=True)
class KasaSeam(LoraSeam):
  """LoRA with the singular values folded into A (`lora_a` = A·diag d)
  plus a side output: this layer's regulariser from the raw `kasa_a`,
  `lora_b`, `kasa_d`."""
  beta: float = 0.0
  gamma: float = 0.0
  orth: str = "rank"

  def linear(self, name, x, kernel, bias, adapters):
    y = super().linear(name, x, kernel, bias, adapters)
    if "kasa_d" not in adapters:
      return y
    reg = regulariser(adapters["kasa_a"], adapters["lora_b"],
                      adapters["kasa_d"], beta=self.beta, gamma=self.gamma,
                      orth=self.orth)
    return y, {REG: reg}


@register("kasa")
class Kasa(Lora):
  """KaSA (see the module docstring). Layer-stack targets only (the
  regulariser travels as a layer side output)."""
  wants_model_aux = True

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.kasa_orth not in ("rank", "full"):
      raise errors.ConfigError(
          f"config.peft.kasa_orth: '{cfg.kasa_orth}' (expected rank | full)")
    if cfg.kasa_reduce not in ("mean", "sum"):
      raise errors.ConfigError(
          f"config.peft.kasa_reduce: '{cfg.kasa_reduce}' (expected mean | "
          "sum)")

  @property
  def seam(self):
    return KasaSeam(tuple(sorted(self._scales.items())), self.cfg.dropout,
                    self.cfg.kasa_beta, self.cfg.kasa_gamma,
                    self.cfg.kasa_orth)

  def targets(self, params):
    out = super().targets(params)
    flat = tree.flatten(params, tree.is_axes)
    for m, (r, _) in out.items():
      if not m.startswith("layers/"):
        raise errors.ConfigError(
            f"config.peft.targets: '{m}' is outside the layer stack; KaSA "
            "adapts layer linears only")
      shape = flat[m + "/kernel"]
      shape = getattr(shape, "shape", None) or ()
      if shape and r >= min(shape[-2:]):
        raise errors.ConfigError(
            f"config.peft.rank: {r} must be < min(in, out) = "
            f"{min(shape[-2:])} for KaSA on '{m}'")
    return out

  def init_module(self, key, w, r, s):
    del s
    *lead, d_in, d_out = w.shape
    k_a, k_d = jax.random.split(key)
    keep, _ = truncate(w, r)
    return {"lora_a": lowrank.kaiming_a(k_a, d_in, r, lead, w.dtype),
            "lora_b": jnp.zeros((*lead, r, d_out), w.dtype),
            "lora_diag": jax.random.normal(k_d, (*lead, r), w.dtype)}, keep

  def module_axes(self, lead, ax_in, ax_out):
    return dict(super().module_axes(lead, ax_in, ax_out),
                lora_diag=(*lead, "rank"))

  def adapters_for(self, trainable, frozen):
    del frozen
    flat = tree.flatten(trainable)
    out = {}
    for m in self._scales:
      a, d = flat[m + "/lora_a"], flat[m + "/lora_diag"]
      out.update({f"{m}/lora_a": a * d[..., None, :],
                  f"{m}/lora_b": flat[m + "/lora_b"],
                  f"{m}/kasa_a": a, f"{m}/kasa_d": d})
    return tree.unflatten(out)

  def aux_loss(self, side, batch):
    del batch
    regs = [v.reshape(-1) for k, v in sorted(side.items())
            if k.endswith("/" + REG)]
    if not regs:
      return 0.0, {}
    regs = jnp.concatenate(regs)
    pen = jnp.mean(regs) if self.cfg.kasa_reduce == "mean" else jnp.sum(regs)
    return pen, {REG: pen}

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    """KaSA's singular values and truncated base have no plain-LoRA form;
    export the merged checkpoint instead."""
    del trainable, frozen, model_cfg, out_dir
    return False
