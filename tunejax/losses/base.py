"""Loss registry and the `Head` passed to every loss."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from tunejax import errors


class Head(NamedTuple):
  """What a loss needs from a model: final hidden states + unembedding.

  `w` is the unembedding as the model stores it: `[D, V]` (an lm_head) or,
  with `vocab_axis=0`, `[V, D]` (a tied embedding table, which the fused
  token-loss op reads without a transposed copy). `w_DxV` is the `[D, V]`
  view for code that needs that layout.
  """
  h_BxLxD: jax.Array
  w: jax.Array
  softcap: Optional[float] = None
  # (penalty, {metric: value}) from the PEFT method's side outputs (e.g.
  # MoE-LoRA's router balance); the trainer adds penalty to the mean loss.
  model_aux: Any = None
  # [B, L] last-layer head-averaged attention mass of each input position
  # on its prompt tokens (`prompt_keys`), detached; for losses registered
  # with `needs_attn_mass` (ssToken), else None.
  attn_mass: Any = None
  vocab_axis: int = 1

  @property
  def w_DxV(self) -> jax.Array:
    return self.w if self.vocab_axis == 1 else self.w.T


# softcap and vocab_axis are static: tree maps (e.g. stop_gradient over the
# reference Head) and jit must not turn them into traced values.
jax.tree_util.register_pytree_node(
    Head,
    lambda hd: ((hd.h_BxLxD, hd.w, hd.model_aux, hd.attn_mass),
                (hd.softcap, hd.vocab_axis)),
    lambda static, kids: Head(kids[0], kids[1], static[0], kids[2], kids[3],
                              static[1]))


# loss(policy: Head, batch, *, ref: Head | None, **options)
#   -> (loss_sum, denom, aux: dict of scalars)
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, Any]]]

_REGISTRY: dict[str, LossFn] = {}


def register(name: str, *, needs_ref: bool = False,
             needs_attn_mass: bool = False):
  """Decorator adding a loss under `name`; duplicate names raise.

  `needs_ref=True` makes the train step also compute the reference model's
  `Head` (the frozen base: PEFT adapters off) and pass it as `ref`.
  `needs_attn_mass=True` makes the policy Head carry `attn_mass` unless the
  loss options say `attention=False`.
  """
  def deco(fn: LossFn) -> LossFn:
    if name in _REGISTRY:
      raise ValueError(f"loss '{name}' registered twice")
    fn.needs_ref = needs_ref
    fn.needs_attn_mass = needs_attn_mass
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


def prompt_keys(batch) -> jax.Array:
  """[B, L] float: 1 where the input token is prompt, not response.

  An input token is response when it is the target of a trained position
  just before it in the same segment (`loss_mask[t-1] > 0`); padding
  (segment 0) is neither.
  """
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  prev_trained = jnp.pad(mask[:, :-1] > 0, ((0, 0), (1, 0)))
  same_prev = jnp.pad(seg[:, 1:] == seg[:, :-1], ((0, 0), (1, 0)))
  return ((seg > 0) & ~(prev_trained & same_prev)).astype(jnp.float32)
