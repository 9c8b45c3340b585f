"""The PEFT method interface, its registry, and the non-adapter methods."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from tunejax import errors, tree
from tunejax.models.seam import Seam


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  # none (full FT) | freeze | lora | rslora | dora | pissa | olora | vera
  method: str = "none"
  # 'freeze': regexes over param names that stay trainable (others frozen).
  trainable: tuple[str, ...] = (".*",)
  # LoRA family.
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = (r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))",)
  # (regex, rank, alpha) per-target overrides; first match wins.
  overrides: tuple[tuple[str, int, float], ...] = ()
  rslora: bool = False  # s = alpha / sqrt(r) for any LoRA-family method
  svd_niter: int = 0  # PiSSA: 0 = exact SVD, k > 0 = randomized, k iters
  vera_d_init: float = 0.1  # VeRA: initial lambda_d

  def validate(self):
    if self.method not in _REGISTRY:
      raise errors.ConfigError(
          f"config.peft.method: unknown method '{self.method}' "
          f"(known: {sorted(_REGISTRY)})")
    for p in self.trainable + self.targets:
      try:
        re.compile(p)
      except re.error as e:
        raise errors.ConfigError(f"config.peft: bad regex '{p}': {e}") \
            from None


class Method:
  """A PEFT method. Subclasses override what differs from full FT."""

  seam: Seam = Seam()

  def __init__(self, cfg: PeftConfig):
    self.cfg = cfg

  def init(self, rng, params) -> tuple[dict, dict]:
    """Model params -> (trainable, frozen) trees. Must be jit-able."""
    del rng
    return params, {}

  def assemble(self, trainable, frozen, rng=None) -> tuple[dict, Any]:
    """(trainable, frozen) -> (model params, adapters) for the forward."""
    del rng
    return tree.merge(trainable, frozen), None

  def reference(self, trainable, frozen) -> tuple[dict, Any]:
    """(model params, adapters) of the reference model for losses that
    need one: the base model before fine-tuning. Adapter methods return the
    frozen base with adapters off; full fine-tuning has no such copy."""
    del trainable, frozen
    raise errors.ConfigError(
        f"config.loss.name needs a reference model, which peft.method "
        f"'{self.cfg.method}' does not keep (use an adapter method such as "
        "'lora': its reference is the base with adapters off)")

  def merged(self, trainable, frozen) -> dict:
    """Plain model params with the method folded in (for export)."""
    return self.assemble(trainable, frozen)[0]

  def axes(self, model_axes) -> tuple[dict, dict]:
    """Logical axis names of (trainable, frozen), given the model's."""
    return model_axes, {}

  def export_adapter(self, trainable, frozen, model_cfg, out_dir) -> bool:
    """Writes a Hugging Face PEFT-format adapter dir (adapter_config.json +
    adapter_model.safetensors); False if the method has no such form."""
    del trainable, frozen, model_cfg, out_dir
    return False


_REGISTRY: dict[str, Callable[[PeftConfig], Method]] = {}


def register(name: str):
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"peft method '{name}' registered twice")
    _REGISTRY[name] = cls
    return cls
  return deco


def get(cfg: PeftConfig) -> Method:
  return _REGISTRY[cfg.method](cfg)


register("none")(Method)


@register("freeze")
class Freeze(Method):
  """Trains only params whose names match `peft.trainable` (e.g. norms,
  the MLPs, or BitFit-style biases); the rest is frozen data."""

  def _is_trainable(self, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in self.cfg.trainable)

  def init(self, rng, params):
    del rng
    names = tree.flatten(params)
    for p in self.cfg.trainable:
      if not any(re.fullmatch(p, n) for n in names):
        raise errors.ConfigError(
            f"config.peft.trainable: '{p}' matches no parameter")
    return tree.split(params, self._is_trainable)

  def axes(self, model_axes):
    return tree.split(model_axes, self._is_trainable, is_leaf=tree.is_axes)
