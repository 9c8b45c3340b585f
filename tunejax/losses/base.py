"""Loss registry and the `Head` passed to every loss."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

from tunejax import errors


class Head(NamedTuple):
  """What a loss needs from a model: final hidden states + unembedding."""
  h_BxLxD: jax.Array
  w_DxV: jax.Array
  softcap: Optional[float] = None
  # (penalty, {metric: value}) from the PEFT method's side outputs (e.g.
  # MoE-LoRA's router balance); the trainer adds penalty to the mean loss.
  model_aux: Any = None


# loss(policy: Head, batch, *, ref: Head | None, **options)
#   -> (loss_sum, denom, aux: dict of scalars)
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, Any]]]

_REGISTRY: dict[str, LossFn] = {}


def register(name: str, *, needs_ref: bool = False):
  """Decorator adding a loss under `name`; duplicate names raise.

  `needs_ref=True` makes the train step also compute the reference model's
  `Head` (the frozen base: PEFT adapters off) and pass it as `ref`.
  """
  def deco(fn: LossFn) -> LossFn:
    if name in _REGISTRY:
      raise ValueError(f"loss '{name}' registered twice")
    fn.needs_ref = needs_ref
    _REGISTRY[name] = fn
    return fn
  return deco


def get(name: str) -> LossFn:
  if name not in _REGISTRY:
    raise errors.ConfigError(
        f"config.loss.name: unknown loss '{name}' (known: {names()})")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)
