"""(IA)^3: learned rescaling of keys, values and FFN activations.

    output-scaled module   y = l ⊙ (x W + b)        (k, v projections)
    input-scaled module    y = (l ⊙ x) W + b        (the FFN down proj)

Liu et al. 2022 (arXiv 2205.05638) scale the keys and values of attention
and the FFN's inner activation; l starts at 1, so training starts at the
base model. As in PEFT (`tuners/ia3/layer.py`: `feedforward_modules` scale
the input, other targets the output), the scales sit on the projections, so
for k they act before RoPE and any k-norm, and every scale folds exactly
into the weights (`merged`): W ⊙ l over output columns (and b ⊙ l), or over
input rows for the input-scaled ones. `peft.ia3_k_after_rope` instead
scales the keys the attention actually uses (after RoPE and k-norm, 'attn/k'
hook, l [G·K]): the paper's l_k ⊙ K read literally for rotary models.
RoPE mixes dims i and i + K/2 and RMS k-norm rescales, so that form does not
fold into plain weights and `merged` refuses it.
"""
from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from tunejax import errors, tree
from tunejax.models.seam import Seam
from tunejax.peft import peft_format, prompt_format
from tunejax.peft.base import Method, PeftConfig, register

_K = "layers/attn/k"


@dataclasses.dataclass(frozen=True)
class Ia3Seam(Seam):
  """Scales linears whose adapters hold 'ia3' and post-RoPE keys holding
  'ia3_rope'."""
  feedforward: tuple[str, ...] = ()

  def linear(self, name, x, kernel, bias, adapters):
    if "ia3" not in adapters:
      return super().linear(name, x, kernel, bias, adapters)
    scale = adapters["ia3"].astype(x.dtype)
    if name in self.feedforward:
      return super().linear(name, x * scale, kernel, bias, {})
    return super().linear(name, x, kernel, bias, {}) * scale

  def act(self, name, x, adapters):
    if name == "attn/k" and "ia3_rope" in adapters:
      # [G·K] split like the heads: x is [B, L, G, K].
      return x * adapters["ia3_rope"].reshape(x.shape[-2:]).astype(x.dtype)
    return x


@register("ia3")
class Ia3(Method):
  """Trainable tree: '<module>/ia3' vectors (layer-stacked), init 1."""
  trains_base_weights = False

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    self._ff: tuple[str, ...] = ()

  @property
  def seam(self):
    return Ia3Seam(self._ff)

  def targets(self, params) -> dict[str, bool]:
    """{module path: is input-scaled} for the kernels `ia3_targets` hits."""
    mods = [n[:-len("/kernel")] for n in tree.flatten(params, tree.is_axes)
            if n.endswith("/kernel")]
    for pat in self.cfg.ia3_targets:
      if not any(re.fullmatch(pat, m) for m in mods):
        raise errors.ConfigError(
            f"config.peft.ia3_targets: '{pat}' matches no module")
    out = {m: any(re.fullmatch(p, m) for p in self.cfg.ia3_feedforward)
           for m in mods if any(re.fullmatch(p, m)
                                for p in self.cfg.ia3_targets)}
    self._ff = tuple(sorted(m for m, ff in out.items() if ff))
    return out

  def _after_rope(self, module: str) -> bool:
    return self.cfg.ia3_k_after_rope and module == _K

  def init(self, rng, params):
    del rng
    flat, out = tree.flatten(params), {}
    for m, ff in self.targets(params).items():
      w = flat[m + "/kernel"]
      *lead, d_in, d_out = w.shape
      size = d_in if ff else d_out
      key = "/ia3_rope" if self._after_rope(m) else "/ia3"
      out[m + key] = jnp.ones((*lead, size), w.dtype)
    return tree.unflatten(out), params

  def assemble(self, trainable, frozen, rng=None):
    del rng
    if not self._ff and self.cfg.ia3_feedforward:
      self.targets(frozen)  # restored without init(): recompute
    return frozen, trainable

  def reference(self, trainable, frozen):
    del trainable
    return frozen, None

  def merged(self, trainable, frozen):
    flat, ff = tree.flatten(frozen), self.targets(frozen)
    for name, l in tree.flatten(trainable).items():
      m = name.rsplit("/", 1)[0]
      if name.endswith("/ia3_rope"):
        raise errors.CheckpointError(
            "config.peft.ia3_k_after_rope: key scales after RoPE / k-norm "
            "do not fold into the weights; train with it off to export")
      w = flat[m + "/kernel"]
      l32 = l.astype(jnp.float32)
      if ff[m]:
        flat[m + "/kernel"] = (w * l32[..., :, None]).astype(w.dtype)
      else:
        flat[m + "/kernel"] = (w * l32[..., None, :]).astype(w.dtype)
        if m + "/bias" in flat:
          b = flat[m + "/bias"]
          flat[m + "/bias"] = (b * l32).astype(b.dtype)
    return tree.unflatten(flat)

  @property
  def has_merged_form(self):
    return not self.cfg.ia3_k_after_rope

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    """PEFT's IA3 scales the k projection (before RoPE): no PEFT form for
    `ia3_k_after_rope`."""
    if self.cfg.ia3_k_after_rope:
      return False
    peft_format.write_adapter(*prompt_format.ia3_tensors(
        self.targets(frozen), trainable, model_cfg), out_dir)
    return True

  def axes(self, model_axes):
    flat, out = tree.flatten(model_axes, tree.is_axes), {}
    for m, ff in self.targets(model_axes).items():
      *lead, ax_in, ax_out = flat[m + "/kernel"]
      key = "/ia3_rope" if self._after_rope(m) else "/ia3"
      out[m + key] = (*lead, ax_in if ff else ax_out)
    return tree.unflatten(out), model_axes
