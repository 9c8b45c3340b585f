"""Sparse fine-tuning: k trainable deltas per matrix through the seam.

    W_eff = W + scatter(indices, values)       indices: int32 [..., k] flat

For each kernel matched by `peft.targets`, the trainable tree holds
`{module: {'values': [..., k]}}` (float32, zero at init, so training starts
at the base model) and `frozen['peft']` holds `{module: {'indices': ...}}`;
layer-stacked kernels get layer-stacked `[n_layers, k]` leaves. Optimizer
state therefore exists for the k values only. The k axis takes the logical
name of the matrix's input axis, so deltas shard over the same mesh axis
as their matrix.

Methods (registry names):
  sparse  a static mask from `peft.sparse_mask` (see `masks.py`): random,
          magnitude, lift (rank `lift_rank`), fisher (squared gradients over
          `sparse_batches` training batches, at the start), lt_sft.
  spiel   SpIEL-AG (Ansell et al. 2024, arXiv 2401.16405; AlanAnsell/peft
          `tuners/sft`): every `spiel_every` steps, per matrix, drop the
          n = ⌊k·p⌋ active entries with the smallest |value| and grow the n
          entries outside the kept set with the largest |Σ_b ∂L_b/∂W| over
          `sparse_batches` batches (a dropped entry grown again is kept as
          it was); new values start at 0 with zeroed
          optimizer moments (the paper's code seeds them from the gradient
          statistics with a per-entry Adam age instead). p = 1 at the first
          reselection (`spiel_first_full`), then p = rate·(1 − t/T) (linear)
          or rate·(1 + cos(πt/T))/2 (cosine). The dense gradient is computed
          one module (one layer-stacked matrix) at a time. Simplification:
          all dense gradients are summed, where the code sums only over a
          top-k candidate set chosen at the first batch.
  lt_sft  LT-SFT (Ansell et al. 2022; cambridgeltl/composable-sft): at the
          start, fully fine-tune the targeted matrices for `lt_sft_steps`
          steps (the run's optimizer settings), keep the top-k |θ1 − θ0| per
          matrix, reset to θ0 and train only those entries. With
          `lt_sft_global`, one top-K over all matrices (K = Σ budgets, the
          paper's global variant): shapes stay static, so every matrix has
          ⌈slack·k⌉ slots and a frozen `active` 0/1 mask; inactive slots get
          no gradient and stay exactly 0.
  LIFT (`sparse_mask='lift'`, zihanghliu/LIFT): with `lift_every` > 0 the
          mask is re-selected every `lift_every` steps from the current
          weights; the deltas are first folded into the frozen kernels (LIFT
          trains the weights themselves, so entries that leave keep their
          change), staying entries keep their optimizer moments, new ones
          start at zero. After such a fold `export/delta` holds only the
          latest interval and the reference model is the folded one; use
          `export/hf`.

Data-driven masks and drop/grow are host events between jitted steps
(`on_start`, `on_step`), each a pure jitted state transformation.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from tunejax import errors, tree
from tunejax.models.seam import Seam, matmul
from tunejax.peft import masks, merging
from tunejax.peft.spiel import drop_fraction, spiel_update
from tunejax.peft.base import EventContext, Method, PeftConfig, register

EXTRA = "peft"  # frozen[EXTRA][module]['indices']
MASKS = ("random", "magnitude", "lift", "fisher", "lt_sft")


def add_delta(w: jax.Array, indices: jax.Array, values: jax.Array
              ) -> jax.Array:
  """W + scatter(indices, values) in float32, for [..., in, out] kernels.

  Duplicate indices add up (so concatenated deltas compose additively).
  """
  *lead, d_in, d_out = w.shape
  flat = w.astype(jnp.float32).reshape(-1, d_in * d_out)
  idx = indices.reshape(flat.shape[0], -1)
  vals = values.astype(jnp.float32).reshape(idx.shape)
  out = jax.vmap(lambda f, i, v: f.at[i].add(v))(flat, idx, vals)
  return out.reshape(*lead, d_in, d_out)


def active_values(leaves: dict) -> jax.Array:
  """A module's values, zero on inactive slots (global LT-SFT)."""
  if "active" not in leaves:
    return leaves["values"]
  return leaves["values"] * leaves["active"].astype(leaves["values"].dtype)


@dataclasses.dataclass(frozen=True)
class SparseSeam(Seam):
  """Adds the scattered delta to kernels whose adapters hold `values`."""

  def linear(self, name, x, kernel, bias, adapters):
    if "values" not in adapters:
      return super().linear(name, x, kernel, bias, adapters)
    w = add_delta(kernel, adapters["indices"], active_values(adapters))
    y = matmul(x, w.astype(x.dtype))
    return y if bias is None else y + bias.astype(x.dtype)


def _with_leaf(d: dict, name: str, x) -> dict:
  flat = tree.flatten(d)
  flat[name] = x
  return tree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=3)
def lift_reselect(w, indices, values, rank: int):
  """LIFT's periodic re-selection for one matrix. Pure.

  Folds the deltas into the kernel (LIFT trains the weights themselves, so
  entries leaving the mask keep their change), then re-selects the top-k
  |(W + Δ)_f|. Returns (folded kernel, new indices, source) where source
  [..., k] is the old slot each new entry had (its moments carry over),
  or -1 for a newly selected entry.
  """
  k = indices.shape[-1]
  w_eff = add_delta(w, indices, values)
  new = masks.lift_indices(w_eff, k, rank)

  def one(old, nw):
    order = jnp.argsort(old)
    pos = jnp.clip(jnp.searchsorted(old[order], nw), 0, k - 1)
    return jnp.where(old[order][pos] == nw, order[pos], -1)
  src = jax.vmap(one)(indices.reshape(-1, k), new.reshape(-1, k))
  return w_eff.astype(w.dtype), new, src.reshape(new.shape).astype(jnp.int32)


def replace_entries(state, tx, new_indices: dict, new_values: dict,
                    source: dict, kernels: dict | None = None):
  """State with new indices/values (and optionally frozen kernels) per
  module; the optimizer state of new slot j is old slot source[j]'s, zero
  where source is -1. Pure; modules keyed by path."""
  flat_t, flat_f = tree.flatten(state.params), tree.flatten(state.frozen)
  src = {}
  for m in new_indices:
    flat_t[m + "/values"] = new_values[m].astype(flat_t[m + "/values"].dtype)
    flat_f[f"{EXTRA}/{m}/indices"] = new_indices[m]
    src[m + "/values"] = source[m]
  for m, w in (kernels or {}).items():
    flat_f[m + "/kernel"] = w
  for n, x in flat_t.items():  # Untouched trainable leaves: kept as is.
    src.setdefault(n, jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape))

  def carry(s, j):
    if not hasattr(s, "shape") or s.shape != j.shape:
      return s
    got = jnp.take_along_axis(s, jnp.maximum(j, 0), axis=-1)
    return jnp.where(j >= 0, got, jnp.zeros_like(s))

  opt = optax.tree_map_params(tx, carry, state.opt_state,
                              tree.unflatten(src))
  return state.replace(params=tree.unflatten(flat_t),
                       frozen=tree.unflatten(flat_f), opt_state=opt)


@register("sparse")
class Sparse(Method):
  """Sparse deltas on the kernels of `peft.targets` (static mask)."""

  seam = SparseSeam()
  regrow = False  # SpIEL drop/grow events

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.sparse_mask not in MASKS:
      raise errors.ConfigError(
          f"config.peft.sparse_mask: unknown mask '{cfg.sparse_mask}' "
          f"(known: {list(MASKS)})")
    if not 0 < cfg.sparse_density <= 1:
      raise errors.ConfigError("config.peft.sparse_density: must be in (0, 1]")
    if cfg.spiel_schedule not in ("linear", "cosine"):
      raise errors.ConfigError(
          "config.peft.spiel_schedule: must be 'linear' or 'cosine'")
    self._jitted: dict = {}

  @property
  def mask(self) -> str:
    return self.cfg.sparse_mask

  def modules(self, params) -> list[str]:
    return masks.target_modules(list(tree.flatten(params, tree.is_axes)),
                                self.cfg.targets)

  def budget(self, shape) -> int:
    c = self.cfg
    rank = c.rank if c.sparse_match_rank < 0 else c.sparse_match_rank
    k = masks.budget(shape[-2], shape[-1], k=c.sparse_k, match_rank=rank,
                     density=c.sparse_density)
    if self.regrow and 2 * k > shape[-2] * shape[-1]:
      raise errors.ConfigError(
          f"config.peft: SpIEL needs k <= half of each matrix; k={k} for a "
          f"{shape[-2]}x{shape[-1]} matrix (lower the sparse budget)")
    return k

  def initial_indices(self, key, w, k):
    if self.mask == "magnitude":
      return masks.magnitude_indices(w, k)
    if self.mask == "lift":
      return masks.lift_indices(w, k, self.cfg.lift_rank)
    return masks.random_indices(key, w.shape, k)  # fisher / lt_sft: later

  def init(self, rng, params):
    flat = tree.flatten(params)
    values, indices = {}, {}
    for i, m in enumerate(self.modules(params)):
      w = flat[m + "/kernel"]
      k = self.budget(w.shape)
      indices[m + "/indices"] = self.initial_indices(
          jax.random.fold_in(rng, i), w, k)
      values[m + "/values"] = jnp.zeros((*w.shape[:-2], k), jnp.float32)
    return tree.unflatten(values), dict(params,
                                        **{EXTRA: tree.unflatten(indices)})

  def _base(self, frozen) -> dict:
    return {k: v for k, v in frozen.items() if k != EXTRA}

  def assemble(self, trainable, frozen, rng=None):
    del rng
    return self._base(frozen), tree.merge(trainable, frozen[EXTRA])

  def reference(self, trainable, frozen):
    del trainable
    return self._base(frozen), None

  def merged(self, trainable, frozen):
    flat, idx = tree.flatten(self._base(frozen)), tree.flatten(frozen[EXTRA])
    for m, leaves in delta_of(trainable, frozen, to_host=False).items():
      w = flat[m + "/kernel"]
      flat[m + "/kernel"] = add_delta(w, leaves["indices"],
                                      leaves["values"]).astype(w.dtype)
    return tree.unflatten(flat)

  def axes(self, model_axes):
    flat = tree.flatten(model_axes, tree.is_axes)
    vals, idx = {}, {}
    for m in self.modules(model_axes):
      *lead, ax_in, _ = flat[m + "/kernel"]
      vals[m + "/values"] = idx[m + "/indices"] = (*lead, ax_in)
    return tree.unflatten(vals), dict(model_axes,
                                      **{EXTRA: tree.unflatten(idx)})

  def export_delta(self, trainable, frozen, out_dir):
    merging.save_delta(delta_of(trainable, frozen), out_dir)
    return True

  # --- host events -------------------------------------------------------

  def dense_grad(self, ctx: EventContext, state, batch, module: str):
    """∂L/∂W of one module's (layer-stacked) matrix; = ∂L/∂W_eff."""
    if ("grad", module) not in self._jitted:
      name = module + "/kernel"

      def grad(params, frozen, batch):
        f = lambda w: ctx.objective(params, _with_leaf(frozen, name, w),
                                    batch, None)
        return jax.grad(f)(tree.flatten(frozen)[name])
      self._jitted[("grad", module)] = jax.jit(grad)
    return self._jitted[("grad", module)](state.params, state.frozen, batch)

  def grad_scores(self, ctx, state, module, batches, square: bool):
    """|Σ_b g_b| (SpIEL) or Σ_b g_b² (Fisher) for one module."""
    acc = None
    for b in batches:
      g = self.dense_grad(ctx, state, b, module)
      g = g * g if square else g
      acc = g if acc is None else acc + g
    return acc if square else jnp.abs(acc)

  def _replace(self, ctx, state, idx, vals, source, kernels=None):
    key = ("replace", kernels is None)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
          lambda *a: replace_entries(a[0], ctx.tx, *a[1:]),
          out_shardings=ctx.state_shardings)
    return self._jitted[key](state, idx, vals, source, kernels)

  def _reselect(self, ctx, state, select):
    """Sets every module's indices to `select(module, w, k)`; values and
    moments restart at zero."""
    flat_f = tree.flatten(state.frozen)
    idx, vals, rep = {}, {}, {}
    for m in self.modules(self._base(state.frozen)):
      old = flat_f[f"{EXTRA}/{m}/indices"]
      idx[m] = select(m, flat_f[m + "/kernel"], old.shape[-1])
      vals[m] = jnp.zeros(old.shape, jnp.float32)
      rep[m] = jnp.full(old.shape, -1, jnp.int32)
    return self._replace(ctx, state, idx, vals, rep)

  def on_start(self, state, ctx):
    if self.mask == "fisher":
      batches = [ctx.next_batch() for _ in range(self.cfg.sparse_batches)]
      return self._reselect(ctx, state, lambda m, w, k: masks.topk_indices(
          self.grad_scores(ctx, state, m, batches, square=True), k))
    if self.mask == "lt_sft":
      theta1 = self.full_finetune(ctx, state, self.cfg.lt_sft_steps)
      return self._reselect(ctx, state, lambda m, w, k: masks.delta_indices(
          w, theta1[m], k))
    return state

  def full_finetune(self, ctx: EventContext, state, steps: int) -> dict:
    """LT-SFT phase 1: `steps` optimizer steps (config.optim) on the dense
    target kernels, deltas off. Returns {module: θ1 kernel}; `state` is
    not changed (the reset to θ0 is free)."""
    modules = self.modules(self._base(state.frozen))
    flat = tree.flatten(state.frozen)
    kernels = {m: flat[m + "/kernel"] for m in modules}
    if "phase1" not in self._jitted:
      tx = ctx.make_tx(kernels)

      def step(kern, opt, params, frozen, batch):
        def f(kern):
          fz = tree.flatten(frozen)
          fz.update({m + "/kernel": w for m, w in kern.items()})
          return ctx.objective(params, tree.unflatten(fz), batch, None)
        u, opt = tx.update(jax.grad(f)(kern), opt, kern)
        return optax.apply_updates(kern, u), opt
      self._jitted["phase1"] = (tx, jax.jit(step))
    tx, step = self._jitted["phase1"]
    zero = jax.tree.map(jnp.zeros_like, state.params)
    opt = tx.init(kernels)
    for _ in range(steps):
      kernels, opt = step(kernels, opt, zero, state.frozen, ctx.next_batch())
    return kernels

  def _lift_step(self, ctx, state):
    flat_t, flat_f = tree.flatten(state.params), tree.flatten(state.frozen)
    idx, vals, src, kern = {}, {}, {}, {}
    for m in self.modules(self._base(state.frozen)):
      kern[m], idx[m], src[m] = lift_reselect(
          flat_f[m + "/kernel"], flat_f[f"{EXTRA}/{m}/indices"],
          flat_t[m + "/values"], self.cfg.lift_rank)
      vals[m] = jnp.zeros(idx[m].shape, jnp.float32)
    return self._replace(ctx, state, idx, vals, src, kern)

  def on_step(self, state, step, ctx):
    if step >= ctx.total_steps:
      return state
    le = self.cfg.lift_every
    if self.mask == "lift" and le > 0 and step % le == 0:
      return self._lift_step(ctx, state)
    r = self.cfg.spiel_every
    if not self.regrow or r <= 0 or step % r:
      return state
    p = drop_fraction(step, ctx.total_steps, rate=self.cfg.spiel_rate,
                      schedule=self.cfg.spiel_schedule,
                      first=self.cfg.spiel_first_full and step == r)
    batches = [ctx.next_batch() for _ in range(self.cfg.sparse_batches)]
    flat_t, flat_f = tree.flatten(state.params), tree.flatten(state.frozen)
    idx, vals, rep = {}, {}, {}
    for m in self.modules(self._base(state.frozen)):
      v = flat_t[m + "/values"]
      score = self.grad_scores(ctx, state, m, batches, square=False)
      n = jnp.int32(math.floor(v.shape[-1] * p))
      idx[m], vals[m], fresh = spiel_update(
          flat_f[f"{EXTRA}/{m}/indices"], v, score, n)
      rep[m] = jnp.where(fresh, -1, jnp.arange(v.shape[-1], dtype=jnp.int32))
      del score  # one dense matrix alive at a time
    return self._replace(ctx, state, idx, vals, rep)


@register("spiel")
class Spiel(Sparse):
  """SpIEL: sparse deltas with periodic drop (|value|) / grow (|grad|)."""
  regrow = True


def delta_of(trainable, frozen, to_host: bool = True) -> dict:
  """{module: {'indices', 'values'}} of a sparse state (inactive slots'
  values zeroed), as host arrays unless `to_host` is False."""
  idx = tree.flatten(frozen[EXTRA])
  get = jax.device_get if to_host else (lambda x: x)
  out = {}
  for n, v in tree.flatten(trainable).items():
    m = n[: -len("/values")]
    leaves = {"values": v, **{k: idx[f"{m}/{k}"] for k in ("indices",
                                                           "active")
                              if f"{m}/{k}" in idx}}
    out[m] = {"indices": get(leaves["indices"]),
              "values": get(active_values(leaves))}
  return out
