"""Optax chains from config: optimizer, schedule, clipping, decay, lr groups."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax.numpy as jnp
import optax

from tunejax import errors, tree
from tunejax.peft import lora_pro, masks

# Decoupled weight decay skips these by default (norm scales, biases,
# embeddings), as is standard for transformer fine-tuning.
_NO_DECAY = (r".*(norm|scale|bias|embedding).*",)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"           # adamw | adafactor | lion | sgd
  lr: float = 1e-4
  schedule: str = "cosine"      # cosine | linear | constant
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0     # final lr = lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  momentum: float = 0.0         # sgd
  weight_decay: float = 0.0
  no_decay: tuple[str, ...] = _NO_DECAY  # regexes over param names
  clip_norm: float = 1.0        # global-norm clipping; 0 = off
  # (regex, lr multiplier): first match wins; unmatched params use 1.0.
  lr_groups: tuple[tuple[str, float], ...] = ()
  # Per-layer lr x decay^(L-1-l) for layer l; freeze_layers > 0 freezes the
  # embeddings and the lowest layers (peft/masks.py `layerwise_scale`).
  layer_lr_decay: float = 1.0
  freeze_layers: int = 0
  # LoRA-Pro gradient correction (tunejax/peft/lora_pro.py): '' = off, or
  # the free matrix X's mode: 'sylvester' | 'zero' | 'symmetry'.
  lora_pro: str = ""

  def validate(self):
    if self.name not in ("adamw", "adafactor", "lion", "sgd"):
      raise errors.ConfigError(
          f"config.optim.name: unknown optimizer '{self.name}' "
          "(known: adamw, adafactor, lion, sgd)")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise errors.ConfigError(
          f"config.optim.schedule: unknown schedule '{self.schedule}'")
    if self.lr <= 0:
      raise errors.ConfigError("config.optim.lr: must be > 0")
    for pat in self.no_decay + tuple(p for p, _ in self.lr_groups):
      try:
        re.compile(pat)
      except re.error as e:
        raise errors.ConfigError(
            f"config.optim: bad regex '{pat}': {e}") from None


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) then cosine / linear decay / constant."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    main = optax.constant_schedule(cfg.lr)
  if not cfg.warmup_steps:
    return main
  warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warm, main], [cfg.warmup_steps])


def _core(cfg: OptimConfig) -> optax.GradientTransformation:
  """The lr-free update direction of each optimizer."""
  if cfg.name == "adamw":
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.name == "lion":
    return optax.scale_by_lion(b1=cfg.b1, b2=cfg.b2)
  if cfg.name == "adafactor":
    return optax.scale_by_factored_rms()
  return optax.trace(cfg.momentum) if cfg.momentum else optax.identity()


def _group_labels(cfg: OptimConfig, params) -> tuple[dict, list[float]]:
  mults = sorted({1.0, *(float(m) for _, m in cfg.lr_groups)})
  rules = [(p, f"x{float(m)}") for p, m in cfg.lr_groups]
  labels = tree.label_tree(params, rules + [(r".*", "x1.0")],
                           what="config.optim.lr_groups", allow_unused=True)
  _check_groups_used(cfg, params)
  return labels, mults


def _check_groups_used(cfg: OptimConfig, params):
  names = list(tree.flatten(params))
  for pat, _ in cfg.lr_groups:
    if not any(re.fullmatch(pat, n) for n in names):
      raise errors.ConfigError(
          f"config.optim.lr_groups: '{pat}' matches no trainable parameter")


def make_tx(cfg: OptimConfig, params, total_steps: int, *,
            lora_scales: dict[str, float] | None = None
            ) -> tuple[optax.GradientTransformation, Callable]:
  """Builds the optimizer for the trainable `params` tree.

  Returns (tx, lr_schedule). Frozen params never reach the optimizer (they
  live in `TrainState.frozen`), so they get no optimizer state at all.
  `lora_scales` ({module: s}, `Method.lora_scales()`) feeds LoRA-Pro.
  """
  sched = schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.lora_pro:  # Corrects raw (clipped) gradients, before the moments.
    parts.append(lora_pro.lora_pro(lora_scales or {}, cfg.lora_pro))
  parts.append(_core(cfg))
  if cfg.weight_decay:
    decay_mask = tree.map_with_names(
        lambda n, _: not any(re.fullmatch(p, n) for p in cfg.no_decay), params)
    parts.append(optax.add_decayed_weights(cfg.weight_decay, decay_mask))
  if cfg.lr_groups:
    labels, mults = _group_labels(cfg, params)
    parts.append(optax.multi_transform(
        {f"x{m}": optax.scale_by_learning_rate(
            lambda s, m=m: sched(s) * m) for m in mults}, labels))
  else:
    parts.append(optax.scale_by_learning_rate(sched))
  if cfg.layer_lr_decay != 1.0 or cfg.freeze_layers:
    parts.append(masks.layerwise_scale(cfg.layer_lr_decay, cfg.freeze_layers))
  return optax.chain(*parts), sched


def global_norm(grads) -> jnp.ndarray:
  return optax.global_norm(grads)
