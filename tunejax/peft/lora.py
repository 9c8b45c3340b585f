"""LoRA and rsLoRA through the model's seam.

    y = x W (+ b) + s · (x A) B,   A: [in, r], B: [r, out]

A is Kaiming-uniform (bound 1/sqrt(in), PEFT's default), B is zero, so the
adapted model starts exactly at the base model. s = alpha / r (LoRA, Hu et
al. 2021) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023). Targets are
regexes over module paths (a kernel's name without '/kernel', e.g.
'layers/attn/q'); layer-stacked kernels get layer-stacked adapters, and A/B
share their base weight's sharded axis (logical names 'rank' for r).
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from tunejax import errors, tree
from tunejax.models.seam import Seam
from tunejax.peft.base import Method, PeftConfig, register


@dataclasses.dataclass(frozen=True)
class LoraSeam(Seam):
  """Adds s·(x A) B to every linear that has `lora_a`/`lora_b` adapters."""
  scales: tuple[tuple[str, float], ...] = ()

  def linear(self, name, x, kernel, bias, adapters):
    y = super().linear(name, x, kernel, bias, adapters)
    if "lora_a" not in adapters:
      return y
    a = adapters["lora_a"].astype(x.dtype)
    b = adapters["lora_b"].astype(x.dtype)
    return y + dict(self.scales)[name] * jnp.dot(jnp.dot(x, a), b)


def _module(name: str) -> str:
  return name[: -len("/kernel")]


class Lora(Method):
  """LoRA on the kernels whose module path matches `peft.targets`."""
  sqrt_scaling = False

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.dropout:
      raise errors.ConfigError(
          "config.peft.dropout: LoRA dropout is not supported yet; set 0")
    if cfg.rank < 1:
      raise errors.ConfigError("config.peft.rank: must be >= 1")
    self._scales: dict[str, float] = {}

  def _rank_alpha(self, module: str) -> tuple[int, float]:
    for pat, r, alpha in self.cfg.overrides:
      if re.fullmatch(pat, module):
        return int(r), float(alpha)
    return self.cfg.rank, self.cfg.alpha

  def targets(self, params) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} for every adapted kernel."""
    kernels = [_module(n) for n in tree.flatten(params, tree.is_axes)
               if n.endswith("/kernel")]
    for pat in self.cfg.targets:
      if not any(re.fullmatch(pat, m) for m in kernels):
        raise errors.ConfigError(
            f"config.peft.targets: '{pat}' matches no module (modules: "
            f"{sorted(set(kernels))})")
    return {m: self._rank_alpha(m) for m in kernels
            if any(re.fullmatch(p, m) for p in self.cfg.targets)}

  def scale(self, rank: int, alpha: float) -> float:
    return alpha / (math.sqrt(rank) if self.sqrt_scaling else rank)

  @property
  def seam(self):
    return LoraSeam(tuple(sorted(self._scales.items())))

  def init(self, rng, params):
    flat = tree.flatten(params)
    adapters = {}
    for i, (m, (r, alpha)) in enumerate(sorted(self.targets(params).items())):
      w = flat[m + "/kernel"]
      *lead, d_in, d_out = w.shape
      bound = 1.0 / math.sqrt(d_in)
      adapters[m + "/lora_a"] = jax.random.uniform(
          jax.random.fold_in(rng, i), (*lead, d_in, r), w.dtype, -bound, bound)
      adapters[m + "/lora_b"] = jnp.zeros((*lead, r, d_out), w.dtype)
      self._scales[m] = self.scale(r, alpha)
    return tree.unflatten(adapters), params

  def assemble(self, trainable, frozen, rng=None):
    del rng
    if not self._scales:  # restored without init(): recompute the scales
      for m, (r, alpha) in self.targets(frozen).items():
        self._scales[m] = self.scale(r, alpha)
    return frozen, trainable

  def reference(self, trainable, frozen):
    del trainable
    return frozen, None

  def merged(self, trainable, frozen):
    base, adapters = self.assemble(trainable, frozen)
    flat, ad = tree.flatten(base), tree.flatten(adapters)
    for m, s in self._scales.items():
      w = flat[m + "/kernel"]
      delta = jnp.matmul(ad[m + "/lora_a"].astype(jnp.float32),
                         ad[m + "/lora_b"].astype(jnp.float32))
      flat[m + "/kernel"] = (w.astype(jnp.float32) + s * delta).astype(w.dtype)
    return tree.unflatten(flat)

  def axes(self, model_axes):
    flat = tree.flatten(model_axes, tree.is_axes)
    out = {}
    for m in self.targets(model_axes):
      *lead, ax_in, ax_out = flat[m + "/kernel"]
      out[m + "/lora_a"] = (*lead, ax_in, "rank")
      out[m + "/lora_b"] = (*lead, "rank", ax_out)
    return tree.unflatten(out), model_axes


register("lora")(Lora)


@register("rslora")
class RsLora(Lora):
  """rsLoRA: s = alpha / sqrt(r), stable across ranks."""
  sqrt_scaling = True
