"""Data-driven LoRA inits: EVA and CorDA.

Both read statistics of each target's layer input from the first
`peft.calib_batches` training batches (`calibrate.collect`, through the
normal data pipeline) in the host event `on_start`, before the first step
of a fresh run, and then re-initialise the adapters (and, for CorDA, the
residual base) from them. `init` alone gives a data-free fallback with the
same shapes (LoRA's init), so abstract shapes, shardings and checkpoint
restores need no data; `init(rng, params, stats)` is the calibrated init.

EVA (Paischer et al. 2024, "One Initialization to Rule them All",
arXiv 2410.07170; PEFT `lora/eva.py`): A ← the top right-singular vectors
of the centred layer inputs, B = 0. Ranks are redistributed over all
adapted matrices (every layer of every target): each may take up to
round(rho·r) components, and the global budget Σ r goes to the components
with the largest explained-variance ratio (PEFT's `_get_rank_distribution`).
Vectors are sign-fixed like PEFT's `svd_flip` (largest |entry| positive).
Layer-stacked adapters need one shape per target, so A, B are allocated at
rank round(rho·r) and a layer's unused columns of A (and rows of B) are
zero: with both zero their gradients are exactly zero, so they stay zero
under any optimizer; a rank-0 matrix is an adapter that never moves. The
scale stays s = alpha/r, PEFT's `adjust_scaling_factors=True` (alpha·r'/r
at rank r'): the method reports (rank round(rho·r), alpha·round(rho·r)/r),
which gives the same s and a PEFT export with zero-padded ranks. Per-layer
scales (rsLoRA or PEFT's adjust_scaling_factors=False) are not supported.
PEFT stops its incremental PCA when components converge (cosine > tau);
here the budget is the fixed `calib_batches` (see calibrate.py for the Gram
form and its equivalence to PCA).

CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition
Adaptation", arXiv 2406.05223; PEFT `lora/corda.py` `collect_eigens_for_
layer`, `crop_corda_eigens`, `layer.py` `corda_init`): C is the input
covariance (per-sample max-normalised, see calibrate.py), damped as
C + mean(diag C)·δ·I with δ = 0.01 doubled until ‖(C+δ)(C+δ)⁻¹ − I‖_F <
0.05. SVD W_pt·C = U S Vh (W_pt = Wᵀ, [out, in]) and V = (Vh C⁻¹)ᵀ, so
W = U S Vᵀ. IPM (instruction-previewed) adapts the r largest components,
KPM (knowledge-preserved) the r smallest: A = V_r sqrt(S_r/s),
B = sqrt(S_r/s) U_rᵀ, frozen residual W − s·A B (the model starts at the
base; the initial adapters are kept for the reference model, as PiSSA).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tunejax import errors, sharding, tree
from tunejax.peft import calibrate
from tunejax.peft.base import PeftConfig, register
from tunejax.peft.lora import EXTRA, Lora, _Residual

_HI = jax.lax.Precision.HIGHEST


def _whole(x):
  """float32, replicated: LAPACK factorisations on sharded operands hang
  on the fake CPU mesh (see lowrank.py); inits factorise a gathered copy."""
  return sharding.constrain(x.astype(jnp.float32), (None,) * x.ndim)


def _flip_signs(v_DxK):
  """PEFT's `svd_flip(u_based_decision=False)` on columns of V: the entry
  of largest magnitude of every vector is positive."""
  idx = jnp.argmax(jnp.abs(v_DxK), axis=-2, keepdims=True)
  sign = jnp.sign(jnp.take_along_axis(v_DxK, idx, axis=-2))
  return v_DxK * jnp.where(sign == 0, 1.0, sign)


def eva_components(stats: dict, k: int, whiten: bool = False):
  """(V [.., in, k], explained-variance ratio [.., k]) of one module.

  The top-k eigenvectors of the centred scatter G − Σx Σxᵀ / n (right-
  singular vectors of the centred inputs), ratio = λ_i / trace (PEFT's
  `explained_variance_ratio_`). `whiten` divides by sqrt(singular value).
  """
  g, s, n = (_whole(stats[key]) for key in ("gram", "sum", "count"))
  n = jnp.maximum(n, 1.0)[..., None, None]
  scatter = g - s[..., :, None] * s[..., None, :] / n
  evals, evecs = jnp.linalg.eigh(scatter)  # ascending
  evals = jnp.maximum(evals[..., ::-1][..., :k], 0.0)
  v = _flip_signs(evecs[..., :, ::-1][..., :, :k])
  ratio = evals / jnp.trace(scatter, axis1=-2, axis2=-1)[..., None]
  if whiten:
    v = v / jnp.sqrt(jnp.sqrt(evals))[..., None, :]
  return v, ratio


def allocate_ranks(ratios: dict, budget: int) -> dict:
  """{module: [..] int32 rank}: the `budget` largest ratios over all
  modules and layers win a component each (components of a matrix come in
  descending order, so a rank is the count of its winners). Ties go to the
  earlier (module, layer, component) in sorted-name order."""
  names = sorted(ratios)
  flat = jnp.concatenate([ratios[m].reshape(-1) for m in names])
  order = jnp.argsort(-flat, stable=True)
  won = jnp.zeros(flat.shape, bool).at[order[:budget]].set(True)
  out, at = {}, 0
  for m in names:
    size = ratios[m].size
    out[m] = jnp.sum(won[at:at + size].reshape(ratios[m].shape), axis=-1,
                     dtype=jnp.int32)
    at += size
  return out


def _damped_inverse(c_DxD):
  """(C + mean(diag C)·δ·I, its inverse) with PEFT's doubling δ."""
  eye = jnp.eye(c_DxD.shape[-1], dtype=c_DxD.dtype)
  mean_diag = jnp.mean(jnp.diag(c_DxD))
  fix = lambda d: c_DxD + eye * mean_diag * d

  def bad(d):
    f = fix(d)
    err = jnp.linalg.norm(jnp.matmul(f, jnp.linalg.inv(f), precision=_HI)
                          - eye)
    return (err >= 0.05) & (d < 1e6)

  d = jax.lax.while_loop(bad, lambda d: d * 2.0, jnp.float32(0.01))
  return fix(d), jnp.linalg.inv(fix(d))


def corda_factors(w_IxO, cov_IxI, r: int, s: float, mode: str = "ipm"):
  """CorDA's (A [.., in, r], B [.., r, out], residual W − s·A B), float32."""
  w = _whole(w_IxO)
  c_fix, c_inv = jnp.vectorize(_damped_inverse,
                               signature="(d,d)->(d,d),(d,d)")(
                                   _whole(cov_IxI))
  wc_OxI = jnp.matmul(jnp.swapaxes(w, -1, -2), c_fix, precision=_HI)
  u, sv, vh = jnp.linalg.svd(wc_OxI, full_matrices=False)
  v_IxK = jnp.swapaxes(jnp.matmul(vh, c_inv, precision=_HI), -1, -2)
  sel = slice(None, r) if mode == "ipm" else slice(-r, None)
  root = jnp.sqrt(sv[..., sel] / s)
  a = v_IxK[..., :, sel] * root[..., None, :]
  b = jnp.swapaxes(u[..., :, sel] * root[..., None, :], -1, -2)
  return a, b, w - s * jnp.matmul(a, b, precision=_HI)


class _DataDriven(Lora):
  """LoRA whose calibrated init needs layer-input statistics."""
  capture_mode = "scatter"

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.calib_batches < 1:
      raise errors.ConfigError("config.peft.calib_batches: must be >= 1")

  def from_stats(self, flat_frozen: dict, stats: dict) -> dict:
    """{module: (adapter leaves, new frozen kernel or None)}."""
    raise NotImplementedError

  def init(self, rng, params, stats=None):
    """LoRA's init; with `stats` (from `calibrate.collect` on `params`)
    the calibrated one."""
    ad, frozen = super().init(rng, params)
    if stats is None:
      return ad, frozen
    flat_a, flat_f = tree.flatten(ad), tree.flatten(frozen)
    for m, (leaves, w_new) in self.from_stats(flat_f, stats).items():
      for k, v in leaves.items():
        flat_a[f"{m}/{k}"] = v.astype(flat_a[f"{m}/{k}"].dtype)
      if w_new is not None:
        flat_f[m + "/kernel"] = w_new.astype(flat_f[m + "/kernel"].dtype)
    ad = tree.unflatten(flat_a)
    frozen = tree.unflatten(flat_f)
    if EXTRA in frozen and "init" in frozen[EXTRA]:  # residual inits
      frozen[EXTRA] = dict(frozen[EXTRA], init=jax.tree.map(jnp.copy, ad))
    return ad, frozen

  def collect_stats(self, model_cfg, base_params, batches) -> dict:
    """Input statistics of every target over `batches` (base model)."""
    calibrate.check_modules(self.targets(base_params))
    return calibrate.collect(model_cfg, base_params, batches,
                             tuple(self.targets(base_params)),
                             self.capture_mode, self.cfg.calib_label_mask)

  def on_start(self, state, ctx):
    """Calibrates on the first `calib_batches` training batches and
    re-initialises trainable, frozen and optimizer state (sharded)."""
    if ctx.model_cfg is None:
      raise errors.TunejaxError(
          f"peft.method '{self.cfg.method}' needs the model config in the "
          "loop's EventContext (model_cfg)")
    base = self._base(state.frozen)  # calibration sees the plain base model
    stats = self.collect_stats(ctx.model_cfg, base,
                           (ctx.next_batch()
                            for _ in range(self.cfg.calib_batches)))

    # Op by op, not jitted: the whole init as one XLA:CPU program (eigh /
    # SVD of every target) hung with all seven Llama targets (measured;
    # cause not found), while eager dispatch runs the same ops fine.
    t, f = self.init(jax.random.PRNGKey(0), base, stats)
    place = lambda state, t, f: state.replace(params=t, frozen=f,
                                              opt_state=ctx.tx.init(t))
    return jax.jit(place, out_shardings=ctx.state_shardings)(state, t, f)


@register("eva")
class Eva(_DataDriven):
  """EVA: A from the activations' principal directions, ranks by
  explained variance, B = 0 (see the module docstring)."""

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.eva_rho < 1.0:
      raise errors.ConfigError("config.peft.eva_rho: must be >= 1")
    if cfg.rslora:
      raise errors.ConfigError(
          "config.peft.rslora: not supported with method 'eva' (EVA's "
          "per-layer ranks would need per-layer rsLoRA scales)")

  def _base_rank_alpha(self, module: str) -> tuple[int, float]:
    return super()._rank_alpha(module)

  def _rank_alpha(self, module):
    r, alpha = self._base_rank_alpha(module)
    cap = max(1, round(r * self.cfg.eva_rho))
    return cap, alpha * cap / r  # s = alpha / r at the padded rank

  def from_stats(self, flat_frozen, stats):
    comps, ratios, budget = {}, {}, 0
    for m in self._scales:
      cap = self._rank_alpha(m)[0]
      comps[m], ratios[m] = eva_components(stats[m], cap, self.cfg.eva_whiten)
      budget += self._base_rank_alpha(m)[0] * ratios[m][..., 0].size
    ranks = allocate_ranks(ratios, budget)
    out = {}
    for m, v in comps.items():
      keep = jnp.arange(v.shape[-1]) < ranks[m][..., None]
      d_out = flat_frozen[m + "/kernel"].shape[-1]
      out[m] = ({"lora_a": v * keep[..., None, :],
                 "lora_b": jnp.zeros((*v.shape[:-2], v.shape[-1], d_out))},
                None)
    return out

  def ranks(self, trainable) -> dict:
    """{module: [..] rank}: the nonzero columns of each layer's A."""
    flat = tree.flatten(trainable)
    return {m: jnp.sum(jnp.any(flat[m + "/lora_a"] != 0, axis=-2), axis=-1)
            for m in self._scales}


@register("corda")
class Corda(_DataDriven, _Residual):
  """CorDA: SVD of W·C, IPM or KPM components as the adapter, residual
  frozen base (see the module docstring)."""
  capture_mode = "corda"

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.corda_mode not in ("ipm", "kpm"):
      raise errors.ConfigError(
          f"config.peft.corda_mode: '{cfg.corda_mode}' (expected ipm | kpm)")

  def from_stats(self, flat_frozen, stats):
    out = {}
    for m, s in self._scales.items():
      st = stats[m]
      cov = st["gram"] / jnp.maximum(st["count"], 1.0)[..., None, None]
      r = self._rank_alpha(m)[0]
      a, b, res = corda_factors(flat_frozen[m + "/kernel"], cov, r, s,
                                self.cfg.corda_mode)
      out[m] = ({"lora_a": a, "lora_b": b}, res)
    return out
