"""LT-SFT (Ansell et al. 2022, "Composable Sparse Fine-Tuning for
Cross-Lingual Transfer"; cambridgeltl/composable-sft): dense phase 1, then
sparse fine-tuning of the top |θ1 − θ0| entries, per matrix or with one
global ranking (see `tunejax.peft.sparse` for the delta parametrisation).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tunejax import errors, tree
from tunejax.peft import masks
from tunejax.peft.base import register
from tunejax.peft.sparse import EXTRA, Sparse


@register("lt_sft")
class LtSft(Sparse):
  """LT-SFT: full FT, top-k |θ1 − θ0| per matrix (or one global top-K),
  reset, sparse FT."""

  @property
  def mask(self) -> str:
    return "lt_sft"

  def budget(self, shape) -> int:
    k = super().budget(shape)
    if not self.cfg.lt_sft_global:
      return k
    if self.cfg.lt_sft_slack < 1:
      raise errors.ConfigError("config.peft.lt_sft_slack: must be >= 1")
    return min(shape[-2] * shape[-1], math.ceil(self.cfg.lt_sft_slack * k))

  def init(self, rng, params):
    trainable, frozen = super().init(rng, params)
    if not self.cfg.lt_sft_global:
      return trainable, frozen
    # Until the global selection, the first k (per-matrix budget) slots
    # of each matrix are active.
    flat, extra = tree.flatten(params), tree.flatten(frozen[EXTRA])
    for m in self.modules(params):
      shape = flat[m + "/kernel"].shape
      k, slots = Sparse.budget(self, shape), self.budget(shape)
      extra[m + "/active"] = jnp.broadcast_to(
          jnp.arange(slots) < k, (*shape[:-2], slots)).astype(jnp.float32)
    return trainable, dict(frozen, **{EXTRA: tree.unflatten(extra)})

  def axes(self, model_axes):
    t_axes, f_axes = super().axes(model_axes)
    if self.cfg.lt_sft_global:
      extra = tree.flatten(f_axes[EXTRA], tree.is_axes)
      extra.update({n[: -len("/indices")] + "/active": a
                    for n, a in list(extra.items())})
      f_axes = dict(f_axes, **{EXTRA: tree.unflatten(extra)})
    return t_axes, f_axes

  def on_start(self, state, ctx):
    if not self.cfg.lt_sft_global:
      return super().on_start(state, ctx)
    theta1 = self.full_finetune(ctx, state, self.cfg.lt_sft_steps)
    flat_f = tree.flatten(state.frozen)
    cand, total = {}, 0
    for m in self.modules(self._base(state.frozen)):
      old = flat_f[f"{EXTRA}/{m}/indices"]
      d = jnp.abs(theta1[m].astype(jnp.float32) -
                  flat_f[m + "/kernel"].astype(jnp.float32))
      cand[m] = jax.lax.top_k(d.reshape(*d.shape[:-2], -1), old.shape[-1])
      total += int(jnp.sum(flat_f[f"{EXTRA}/{m}/active"]))
    keep = masks.global_topk({m: sc for m, (sc, _) in cand.items()}, total)
    idx = {m: ix.astype(jnp.int32) for m, (_, ix) in cand.items()}
    vals = {m: jnp.zeros(ix.shape, jnp.float32) for m, ix in idx.items()}
    rep = {m: jnp.full(ix.shape, -1, jnp.int32) for m, ix in idx.items()}
    state = self._replace(ctx, state, idx, vals, rep)
    flat_f = tree.flatten(state.frozen)
    for m, on in keep.items():
      name = f"{EXTRA}/{m}/active"
      flat_f[name] = jax.device_put(on.astype(np.float32),
                                    flat_f[name].sharding)
    return state.replace(frozen=tree.unflatten(flat_f))
