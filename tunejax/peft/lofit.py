"""LoFiT: localized fine-tuning of attention-head outputs.

    phase 1   z_h <- (1 + A_h) ⊙ z_h   on every head; loss + λ·Σ|A|
    phase 2   z_h <- z_h + v_h          on the K selected heads only

Yin et al. 2024 (arXiv 2406.01563; official code fc2869/lo-fit, checked in
reference/verified-formulas.md §17). z_h [head_dim] is head h's attention
output before the o projection (the 'attn/heads' seam hook). A and v start
from N(0, lofit_init_std²) (1e-3). Phase 1 ranks heads by ||A_h||_2 and
keeps the top K (`select_heads`); phase 2 starts again from the base model
and trains only v on those heads; the final model keeps only v.

The phase switch is host-level and goes through the config, so each phase
is an ordinary run (checkpoints and resume included):

    out = tasks.run(cfg, workdir1)            # peft.method='lofit', phase 1
    peft2 = lofit.phase2_config(cfg.peft, out["state"].params,
                                model_cfg.n_heads, k)   # pure top-k
    tasks.run(dataclasses.replace(cfg, peft=peft2), workdir2)  # base again

or from the command line, phase 2 as `--config.peft.lofit_phase=2
--config.peft.lofit_heads=(...) --config.peft.lofit_head_dim=K`.

The L1 term λ·Σ|A| (`lofit_l1`) is the method's `aux_loss`: the seam
returns Σ|A| of each layer as a side output.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tunejax import errors, tree
from tunejax.models.seam import Seam
from tunejax.peft.base import Method, PeftConfig, register


@dataclasses.dataclass(frozen=True)
class LofitSeam(Seam):
  """Head scaling (1 + A) or head bias v at the 'attn/heads' hook; the
  vectors are stored flat per layer ([H·K]) and split like the heads."""

  def act(self, name, x, adapters):
    if name != "attn/heads":
      return x
    if "lofit_scale" in adapters:
      a = adapters["lofit_scale"]
      y = x * (1 + a.reshape(x.shape[-2:])).astype(x.dtype)
      return y, {"lofit_l1": jnp.sum(jnp.abs(a.astype(jnp.float32)))}
    if "lofit_bias" in adapters:
      return x + adapters["lofit_bias"].reshape(x.shape[-2:]).astype(x.dtype)
    return x


def select_heads(scale_NxHK, n_heads: int, k: int) -> np.ndarray:
  """Sorted flat ids (layer·H + head) of the k heads with largest ||A_h||,
  from phase 1's scales [n_layers, H·K]."""
  a = scale_NxHK.astype(jnp.float32)
  norms = jnp.linalg.norm(a.reshape(a.shape[0], n_heads, -1), axis=-1)
  _, ids = jax.lax.top_k(norms.reshape(-1), k)
  return np.sort(np.asarray(ids))


def phase2_config(cfg: PeftConfig, phase1_trainable: dict, n_heads: int,
                  k: int) -> PeftConfig:
  """The phase-2 PeftConfig from a trained phase-1 trainable tree."""
  scale = jax.device_get(
      phase1_trainable["layers"]["attn"]["heads"]["lofit_scale"])
  ids = select_heads(scale, n_heads, k)
  return dataclasses.replace(cfg, lofit_phase=2,
                             lofit_heads=tuple(int(i) for i in ids),
                             lofit_head_dim=scale.shape[-1] // n_heads)


@register("lofit")
class Lofit(Method):
  """Phase 1: trainable 'layers/attn/heads/lofit_scale' [n_layers, H·K].
  Phase 2: trainable 'lofit/bias' [len(lofit_heads), K]."""
  trains_base_weights = False

  seam = LofitSeam()
  wants_model_aux = True

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.lofit_phase not in (1, 2):
      raise errors.ConfigError("config.peft.lofit_phase: must be 1 or 2")
    if cfg.lofit_phase == 2 and not (cfg.lofit_heads and cfg.lofit_head_dim):
      raise errors.ConfigError(
          "config.peft.lofit_heads / lofit_head_dim: phase 2 needs the "
          "selected heads (lofit.phase2_config)")

  def _shape(self, params) -> tuple[int, int]:
    """(n_layers, H·K) of the heads' outputs (the o kernel's input)."""
    return params["layers"]["attn"]["o"]["kernel"].shape[:2]

  def init(self, rng, params):
    (n_layers, hk), k = self._shape(params), self.cfg.lofit_head_dim
    dtype, std = params["embed"]["embedding"].dtype, self.cfg.lofit_init_std
    if self.cfg.lofit_phase == 1:
      a = std * jax.random.normal(rng, (n_layers, hk), jnp.float32)
      return {"layers": {"attn": {"heads": {
          "lofit_scale": a.astype(dtype)}}}}, params
    ids, n = np.asarray(self.cfg.lofit_heads), n_layers * hk // k
    if hk % k or ids.min() < 0 or ids.max() >= n or len(set(ids)) < len(ids):
      raise errors.ConfigError(
          f"config.peft.lofit_heads: need distinct ids in [0, {n}) and "
          f"lofit_head_dim dividing {hk}")
    v = std * jax.random.normal(rng, (len(ids), k), jnp.float32)
    return {"lofit": {"bias": v.astype(dtype)}}, params

  def _bias(self, bias_SxK, params):
    n_layers, hk = self._shape(params)
    full = jnp.zeros((n_layers * hk // bias_SxK.shape[1], bias_SxK.shape[1]),
                     bias_SxK.dtype)
    full = full.at[jnp.asarray(self.cfg.lofit_heads)].set(bias_SxK)
    return full.reshape(n_layers, hk)
  def assemble(self, trainable, frozen, rng=None):
    del rng
    if self.cfg.lofit_phase == 1:
      return frozen, trainable
    return frozen, {"layers": {"attn": {"heads": {
        "lofit_bias": self._bias(trainable["lofit"]["bias"], frozen)}}}}

  def reference(self, trainable, frozen):
    del trainable
    return frozen, None

  def aux_loss(self, side, segment_ids_BxL):
    del segment_ids_BxL
    if self.cfg.lofit_phase != 1:
      return 0.0, {}
    l1 = jnp.sum(side["attn/heads/lofit_l1"])
    return self.cfg.lofit_l1 * l1, {"lofit_l1": l1}

  @property
  def has_merged_form(self):
    return self.cfg.lofit_phase == 1

  def merged(self, trainable, frozen):
    if self.cfg.lofit_phase == 2:
      raise errors.CheckpointError(
          "config.peft.method 'lofit' phase 2: head biases would need an o "
          "projection bias, which the model has not; export the adapter")
    flat = tree.flatten(frozen)
    w = flat["layers/attn/o/kernel"]
    a = trainable["layers"]["attn"]["heads"]["lofit_scale"]
    rows = (1 + a.astype(jnp.float32))[..., None]
    flat["layers/attn/o/kernel"] = (w * rows).astype(w.dtype)
    return tree.unflatten(flat)

  def axes(self, model_axes):
    if self.cfg.lofit_phase == 1:
      return {"layers": {"attn": {"heads": {
          "lofit_scale": ("layers", None)}}}}, model_axes
    return {"lofit": {"bias": (None, None)}}, model_axes
