"""A history model kept in the train state: an EMA or periodic snapshot of
the trainable params, used as the reference by losses that compare the
policy with its own past (ssToken's retrospective excess loss).

Selected by `config.loss.options.history`: 'ema' (decay
`history_decay`) or 'snapshot' (refreshed every `history_every` steps).
With h_0 = θ_0 and θ_{t+1} the params after optimizer step t:

    ema:       h_{t+1} = d · h_t + (1 - d) · θ_{t+1}
    snapshot:  h_{t+1} = θ_{t+1} if (t + 1) % every == 0 else h_t

Step t's loss sees h_t. Only trainable params are tracked (for PEFT: the
adapters; the reference is the base with the history adapters), so the
extra memory is one copy of the trainable state.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tunejax import errors

KINDS = ("ema", "snapshot")


class History(NamedTuple):
  kind: str
  decay: float = 0.99
  every: int = 100


def from_loss_options(options: dict) -> History | None:
  """The history spec named by loss options, or None (no history model)."""
  kind = options.get("history")
  if kind not in KINDS:
    return None
  spec = History(kind, float(options.get("history_decay", 0.99)),
                 int(options.get("history_every", 100)))
  if not 0.0 <= spec.decay <= 1.0:
    raise errors.ConfigError("config.loss.options.history_decay: expected "
                             f"a value in [0, 1], got {spec.decay}")
  if spec.every < 1:
    raise errors.ConfigError("config.loss.options.history_every: expected "
                             f">= 1, got {spec.every}")
  return spec


def init(spec: History | None, params) -> Any:
  """h_0 = θ_0 (a copy), or None without a history model."""
  return None if spec is None else jax.tree.map(jnp.copy, params)


def update(spec: History | None, hist, params, step) -> Any:
  """h_{t+1} from h_t and θ_{t+1}; `step` is t (the step just taken)."""
  if spec is None:
    return hist
  if spec.kind == "ema":
    d = spec.decay
    return jax.tree.map(
        lambda h, p: (d * h.astype(jnp.float32) + (1 - d) * p.astype(
            jnp.float32)).astype(h.dtype), hist, params)
  refresh = (step + 1) % spec.every == 0
  return jax.tree.map(lambda h, p: jnp.where(refresh, p, h), hist, params)
