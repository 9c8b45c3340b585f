"""Pure train and eval steps.

Static parts (model apply, loss, optimizer) are bound with
`functools.partial`, then jitted with explicit shardings and donation by
`tunejax.train.compile`. Nothing here reads a config object.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tunejax.losses import Head
from tunejax.state import TrainState
from tunejax.train import history as history_lib

# apply_fn(params, frozen, batch, rng) -> (policy Head, reference Head | None)
ApplyFn = Callable[..., tuple[Head, Head | None]]


def _split_micro(batch, n: int):
  """[B, ...] -> [n, B/n, ...], taking rows i*n + m into micro-batch m.

  Interleaving (not blocking) keeps each device's contiguous rows on that
  device, so micro-batching needs no communication under data sharding.
  """
  def split(x):
    b = x.shape[0]
    return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def _normalise(loss_sum, denom, aux):
  """Divides once: `*_sum` aux entries become per-token means."""
  denom = jnp.maximum(denom, 1e-8)
  out = {"loss": loss_sum / denom}
  for k, v in aux.items():
    if k.endswith("_sum"):
      out[k[:-4]] = v / denom
    else:
      out[k] = v
  return out


def loss_and_grads(params, frozen, batch, rng, *, apply_fn: ApplyFn,
                   loss_fn, micro_batches: int = 1, step=None, history=None):
  """Token-weighted loss pieces and the gradient of sum(loss_sum) / denom.

  Micro-batches are scanned; their loss sums, denominators, aux sums and
  gradient sums are added, and the division happens once at the end, so
  the result equals the big-batch step exactly (up to float summation).
  The loss also sees the micro-batch's key as `rng` and the optimizer
  `step` (sampling losses, scheduled token weights); a history model's
  params ride along as `history` (data: `apply_fn` builds the reference
  from them, no gradient flows there).
  """
  def objective(p, mb, key):
    extra = {"rng": key} if step is None else {"rng": key, "step": step}
    if history is not None:
      extra["history"] = history
    mb = {**mb, **extra}
    loss_sum, denom, aux = loss_fn(apply_fn(p, frozen, mb, key), mb)
    return loss_sum, (denom, aux)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if micro_batches == 1:
    (loss_sum, (denom, aux)), grads = grad_fn(params, batch, rng)
  else:
    def body(carry, xs):
      mb, i = xs
      (ls, (dn, ax)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (ls, dn, ax, g)), None
    mbs = _split_micro(batch, micro_batches)
    first = jax.tree.map(lambda x: x[0], mbs)
    (ls, (dn, ax)), g = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (ls, dn, ax, g))
    (loss_sum, denom, aux, grads), _ = jax.lax.scan(
        body, zeros, (mbs, jnp.arange(micro_batches)))
  grads = jax.tree.map(lambda g: g / jnp.maximum(denom, 1e-8), grads)
  return _normalise(loss_sum, denom, aux), grads


def train_step(state: TrainState, batch, rng, *, apply_fn: ApplyFn, loss_fn,
               tx: optax.GradientTransformation, micro_batches: int = 1,
               history: history_lib.History | None = None):
  """One optimizer step. Returns (new_state, metrics)."""
  rng = jax.random.fold_in(rng, state.step)
  metrics, grads = loss_and_grads(
      state.params, state.frozen, batch, rng, apply_fn=apply_fn,
      loss_fn=loss_fn, micro_batches=micro_batches, step=state.step,
      history=state.history)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  new = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      history=history_lib.update(history, state.history, params, state.step))
  return new, metrics


def eval_step(params, frozen, batch, history=None, *, apply_fn: ApplyFn,
              loss_fn):
  """Loss pieces on one batch, to be summed over an eval set by the host."""
  if history is not None:
    batch = {**batch, "history": history}
  # rng None: eval is deterministic (PEFT methods skip dropout).
  loss_sum, denom, aux = loss_fn(apply_fn(params, frozen, batch, None), batch)
  return {"loss_sum": loss_sum, "denom": denom,
          **{k: v for k, v in aux.items() if k.endswith("_sum")}}
