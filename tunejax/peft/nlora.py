"""Three-matrix LoRA: SLoRA, NLoRA (Nyström init) and IntTune.

Guo et al. 2025, "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large
Language Models"; official code TracyGuo2001/NLoRA, as checked in
reference/verified-formulas.md §6. In tunejax's layout (y = x W, W [in, out]):

    y = x W + s · ((x A) M) B,   A [in, r], M [r, r], B [r, out], s = alpha/r.

- 'slora': A Kaiming-uniform, M Kaiming-uniform (bound 1/sqrt(r)), B = 0.
- 'nlora': A = W[:, :r] (columns), B = W[:r, :] (rows) and
  `nlora_init='nystrom'`: M = pinv(W[:r, :r]) / s, so s·A M B = C W_rr⁺ R,
  the Nyström approximation of W (the paper's formula, stated on
  W_pt = Wᵀ: C = W_pt[:, :r], R = W_pt[:r, :]); `nlora_init='code'`:
  M = W[:r, :r] (the official code: no pseudo-inverse). The paper and the
  code disagree; both are offered. With `nlora_residual` (default) the
  frozen base becomes W − s·A M B, so training starts at the base model
  (PiSSA-style; the initial factors are kept for the reference model);
  without it the base is unchanged and ΔW ≠ 0 at init, as in the code.
- 'inttune': NLoRA's init with A and B frozen; only M (r² per matrix)
  trains.

The seam is LoRA's: `adapters_for` hands it lora_a = A·M (differentiable,
so gradients reach A and M) and lora_b = B.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tunejax import errors, sharding, tree
from tunejax.peft import lowrank
from tunejax.peft.base import PeftConfig, register
from tunejax.peft.lora import EXTRA, Lora, _Residual

_HI = jax.lax.Precision.HIGHEST
FIXED = "fixed"  # frozen[EXTRA][FIXED]: IntTune's frozen A and B


def nystrom_factors(w_IxO, r: int, s: float, mode: str = "nystrom"):
  """(A [.., in, r], M [.., r, r], B [.., r, out]) in float32."""
  w = sharding.constrain(w_IxO.astype(jnp.float32), (None,) * w_IxO.ndim)
  a, b, w_rr = w[..., :, :r], w[..., :r, :], w[..., :r, :r]
  m = jnp.linalg.pinv(w_rr) / s if mode == "nystrom" else w_rr
  return a, m, b


class _ThreeMatrix(Lora):
  """B·M·A adapters through LoRA's seam."""

  def module_axes(self, lead, ax_in, ax_out):
    return dict(super().module_axes(lead, ax_in, ax_out),
                lora_mid=(*lead, "rank", None))

  def _factors(self, flat_t, flat_f, m):
    """(A, M, B) of module m from the trainable / frozen flat trees."""
    get = lambda k: flat_t.get(f"{m}/{k}", flat_f.get(
        f"{EXTRA}/{FIXED}/{m}/{k}"))
    return get("lora_a"), get("lora_mid"), get("lora_b")

  def adapters_for(self, trainable, frozen):
    flat_t, flat_f = tree.flatten(trainable), tree.flatten(frozen)
    out = {}
    for m in self._scales:
      a, mid, b = self._factors(flat_t, flat_f, m)
      out[f"{m}/lora_a"] = jnp.matmul(a, mid.astype(a.dtype), precision=_HI)
      out[f"{m}/lora_b"] = b
    return tree.unflatten(out)


@register("slora")
class Slora(_ThreeMatrix):
  """SLoRA: LoRA with a trainable r x r middle matrix (B = 0 at init)."""

  def init_module(self, key, w, r, s):
    k_lora, k_mid = jax.random.split(key)
    ad, _ = super().init_module(k_lora, w, r, s)
    *lead, _, _ = w.shape
    ad["lora_mid"] = lowrank.kaiming_a(k_mid, r, r, lead, w.dtype)
    return ad, None


@register("nlora")
class Nlora(_ThreeMatrix, _Residual):
  """NLoRA: A, M, B from W's first r columns / rows (Nyström)."""

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.nlora_init not in ("nystrom", "code"):
      raise errors.ConfigError(
          f"config.peft.nlora_init: '{cfg.nlora_init}' (expected nystrom | "
          "code)")

  def init_module(self, key, w, r, s):
    del key
    a, m, b = nystrom_factors(w, r, s, self.cfg.nlora_init)
    res = None
    if self.cfg.nlora_residual:
      res = w.astype(jnp.float32) - s * jnp.matmul(
          jnp.matmul(a, m, precision=_HI), b, precision=_HI)
    cast = lambda x: x.astype(w.dtype)
    return {"lora_a": cast(a), "lora_mid": cast(m), "lora_b": cast(b)}, res

  def extra_init(self, rng, params, adapters):
    if not self.cfg.nlora_residual:
      return {}
    return super().extra_init(rng, params, adapters)

  def extra_axes(self, adapter_axes):
    if not self.cfg.nlora_residual:
      return {}
    return super().extra_axes(adapter_axes)

  def reference(self, trainable, frozen):
    del trainable
    if not self.cfg.nlora_residual:
      return self._base(frozen), None
    # W_res + s·A0 M0 B0 = W: the base model before fine-tuning.
    return self._base(frozen), self.adapters_for(frozen[EXTRA]["init"],
                                                 frozen)

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    """No PEFT form for the three-matrix adapter; export merged."""
    del trainable, frozen, model_cfg, out_dir
    return False


@register("inttune")
class IntTune(Nlora):
  """IntTune: NLoRA's factors with A, B frozen; only M trains."""

  def init(self, rng, params):
    ad, frozen = super().init(rng, params)
    flat = tree.flatten(ad)
    fixed = {k: v for k, v in flat.items() if not k.endswith("/lora_mid")}
    frozen = dict(frozen)
    extra = dict(frozen.get(EXTRA, {}))
    extra[FIXED] = tree.unflatten(fixed)
    if "init" in extra:  # the reference keeps only M's initial value
      extra["init"] = tree.unflatten({k: v for k, v in tree.flatten(
          extra["init"]).items() if k.endswith("/lora_mid")})
    frozen[EXTRA] = extra
    trainable = tree.unflatten({k: v for k, v in flat.items()
                                if k.endswith("/lora_mid")})
    return trainable, frozen

  def axes(self, model_axes):
    t_axes, f_axes = super().axes(model_axes)
    flat = tree.flatten(t_axes, tree.is_axes)
    fixed = {k: v for k, v in flat.items() if not k.endswith("/lora_mid")}
    extra = dict(f_axes.get(EXTRA, {}))
    extra[FIXED] = tree.unflatten(fixed)
    if "init" in extra:
      extra["init"] = tree.unflatten({k: v for k, v in flat.items()
                                      if k.endswith("/lora_mid")})
    return (tree.unflatten({k: v for k, v in flat.items()
                            if k.endswith("/lora_mid")}),
            dict(f_axes, **{EXTRA: extra}))
