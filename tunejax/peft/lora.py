"""The LoRA family through the model's seam: LoRA, rsLoRA, DoRA, PiSSA,
OLoRA, VeRA.

    LoRA   y = x W (+ b) + s · (x A) B,         A: [in, r], B: [r, out]
    DoRA   y = (x W + s·(x A) B) · m / sg(||W + s·sg(A B)||_c) (+ b)
    VeRA   y = x W (+ b) + ((x A_sh ⊙ λ_d) B_sh) ⊙ λ_b

LoRA (Hu et al. 2021): A Kaiming-uniform (bound 1/sqrt(in), PEFT's
default), B zero, so training starts exactly at the base model; s = alpha/r,
or alpha/sqrt(r) for rsLoRA (Kalajdzievski 2023, `peft.rslora` or method
'rslora'). DoRA (Liu et al. 2024, arXiv 2402.09353 §4.3; PEFT
`lora/dora.py`): learned magnitude m initialised to the column norms of W;
the norm is detached, as in the paper and PEFT. PiSSA / OLoRA: SVD / QR
initialisations with a residual frozen base (see `lowrank.py`); their
initial adapters are kept in `frozen['peft']['init']` so the reference
model (the base before fine-tuning) and PEFT export stay exact. VeRA (Kopiczko
et al. 2024, arXiv 2310.11454; PEFT `tuners/vera`): one frozen random pair
A_sh [max_in, r], B_sh [r, max_out] shared by every target (sliced to each
module's size), trainable λ_d (init `vera_d_init`) and λ_b (init 0).

Targets are regexes over module paths (a kernel's name without '/kernel',
e.g. 'layers/attn/q'); layer-stacked kernels get layer-stacked adapters,
and adapters share their base weight's sharded axis (logical 'rank' for r).
Dropout (rate `peft.dropout`, on the adapter branch's input, as PEFT) draws
from the step rng passed to `assemble`; without an rng (eval, generate) it
is off. Without dropout, float32 training shapes on a CPU run plain LoRA
as x (W + s·A B) (`lowrank.merged_linear`, same gradients).
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from tunejax import errors, tree
from tunejax.models.seam import Seam, matmul
from tunejax.peft import lowrank, peft_format
from tunejax.peft.base import Method, PeftConfig, register

EXTRA = "peft"  # frozen[EXTRA]: method-owned frozen tensors (not model params)
# trainable[TRAINED]: model params trained alongside the adapters
# (`peft.also_trainable`, e.g. LongLoRA's embeddings and norms).
TRAINED = "model"


def _dropout(x, key, rate: float):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LoraSeam(Seam):
  """Adapts every linear whose adapters hold `lora_a` (LoRA, DoRA with a
  `magnitude`) or `vera_a` (VeRA); others run plain."""
  scales: tuple[tuple[str, float], ...] = ()
  dropout: float = 0.0

  def linear(self, name, x, kernel, bias, adapters):
    if "lora_a" not in adapters and "vera_a" not in adapters:
      return super().linear(name, x, kernel, bias, adapters)
    xd = x  # The adapter branch's (dropped-out) input.
    if "dropout_key" in adapters and self.dropout > 0:
      xd = _dropout(x, adapters["dropout_key"], self.dropout)
    cast = lambda k: adapters[k].astype(x.dtype)
    if (xd is x and "lora_a" in adapters and "magnitude" not in adapters
        and lowrank.merges_forward(x, kernel)):
      y = lowrank.merged_linear(x, kernel.astype(x.dtype), cast("lora_a"),
                                cast("lora_b"),
                                jnp.float32(dict(self.scales)[name]))
      return y if bias is None else y + bias.astype(x.dtype)
    y = matmul(x, kernel.astype(x.dtype))
    if "vera_a" in adapters:
      h = matmul(matmul(xd, cast("vera_a")) * cast("vera_lambda_d"),
                  cast("vera_b")) * cast("vera_lambda_b")
    else:
      # Scaling the rank-r product, not the [.., out] result, saves an
      # output-sized elementwise pass forward and backward.
      h = matmul(matmul(xd, cast("lora_a")) * dict(self.scales)[name],
                 cast("lora_b"))
    if "magnitude" in adapters:
      # PEFT's form, exact with dropout too: x W + (g - 1)·xd W + g·h.
      w_full = kernel.astype(jnp.float32) + jax.lax.stop_gradient(
          lowrank.lora_delta(adapters["lora_a"], adapters["lora_b"],
                             dict(self.scales)[name]))
      g = (adapters["magnitude"].astype(jnp.float32) /
           jax.lax.stop_gradient(lowrank.col_norm(w_full))).astype(x.dtype)
      yd = y if xd is x else matmul(xd, kernel.astype(x.dtype))
      h = (g - 1) * yd + g * h
    y = y + h
    return y if bias is None else y + bias.astype(x.dtype)


def merge_kernel(w_IxO, adapters: dict, s: float):
  """The plain kernel equal to the adapted linear (no dropout)."""
  f32 = lambda k: adapters[k].astype(jnp.float32)
  if "vera_a" in adapters:
    delta = jnp.matmul(f32("vera_a") * f32("vera_lambda_d")[..., None, :],
                       f32("vera_b")) * f32("vera_lambda_b")[..., None, :]
  else:
    delta = lowrank.lora_delta(adapters["lora_a"], adapters["lora_b"], s)
  w = w_IxO.astype(jnp.float32) + delta
  if "magnitude" in adapters:
    w = w * (f32("magnitude") / lowrank.col_norm(w))[..., None, :]
  return w.astype(w_IxO.dtype)


def _module(name: str) -> str:
  return name[: -len("/kernel")]


class Lora(Method):
  """LoRA on the kernels whose module path matches `peft.targets`."""
  trains_base_weights = False
  sqrt_scaling = False

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if not 0.0 <= cfg.dropout < 1.0:
      raise errors.ConfigError("config.peft.dropout: must be in [0, 1)")
    if cfg.rank < 1:
      raise errors.ConfigError("config.peft.rank: must be >= 1")
    self._scales: dict[str, float] = {}

  def _rank_alpha(self, module: str) -> tuple[int, float]:
    for pat, r, alpha in self.cfg.overrides:
      if re.fullmatch(pat, module):
        return int(r), float(alpha)
    return self.cfg.rank, self.cfg.alpha

  def targets(self, params) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} for every adapted kernel."""
    kernels = [_module(n) for n in tree.flatten(params, tree.is_axes)
               if n.endswith("/kernel")]
    for pat in self.cfg.targets:
      if not any(re.fullmatch(pat, m) for m in kernels):
        raise errors.ConfigError(
            f"config.peft.targets: '{pat}' matches no module (modules: "
            f"{sorted(set(kernels))})")
    return {m: self._rank_alpha(m) for m in kernels
            if any(re.fullmatch(p, m) for p in self.cfg.targets)}

  def lora_scales(self):
    return dict(self._scales)

  def scale(self, rank: int, alpha: float) -> float:
    sqrt = self.sqrt_scaling or self.cfg.rslora
    return alpha / (math.sqrt(rank) if sqrt else rank)

  @property
  def seam(self):
    return LoraSeam(tuple(sorted(self._scales.items())), self.cfg.dropout)

  # --- per-module pieces that variants override -------------------------

  def init_module(self, key, w, r: int, s: float):
    """(adapter leaves, new frozen kernel or None) for one target."""
    del s
    *lead, d_in, d_out = w.shape
    return {"lora_a": lowrank.kaiming_a(key, d_in, r, lead, w.dtype),
            "lora_b": jnp.zeros((*lead, r, d_out), w.dtype)}, None

  def module_axes(self, lead, ax_in, ax_out) -> dict:
    return {"lora_a": (*lead, ax_in, "rank"),
            "lora_b": (*lead, "rank", ax_out)}

  def extra_init(self, rng, params, adapters) -> dict:
    """Method-owned frozen tensors (stored under frozen[EXTRA])."""
    del rng, params, adapters
    return {}

  def extra_axes(self, adapter_axes) -> dict:
    del adapter_axes
    return {}

  # --- Method interface --------------------------------------------------

  def init(self, rng, params):
    flat = tree.flatten(params)
    adapters = {}
    for i, (m, (r, alpha)) in enumerate(sorted(self.targets(params).items())):
      s = self._scales[m] = self.scale(r, alpha)
      w = flat[m + "/kernel"]
      ad, w_new = self.init_module(jax.random.fold_in(rng, i), w, r, s)
      adapters.update({f"{m}/{k}": v for k, v in ad.items()})
      if w_new is not None:
        flat[m + "/kernel"] = w_new.astype(w.dtype)
    adapters = tree.unflatten(adapters)
    extra = self.extra_init(jax.random.fold_in(rng, 1 << 20), params,
                             adapters)
    if extra:
      flat.update(tree.flatten({EXTRA: extra}))
    self._check_trained(flat)
    trained, frozen = tree.split(tree.unflatten(flat), self._is_trained)
    if trained:
      adapters = dict(adapters, **{TRAINED: trained})
    return adapters, frozen

  def _is_trained(self, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in self.cfg.also_trainable)

  def _check_trained(self, names):
    for p in self.cfg.also_trainable:
      if not any(re.fullmatch(p, n) for n in names):
        raise errors.ConfigError(
            f"config.peft.also_trainable: '{p}' matches no parameter")

  def _model_params(self, trainable, frozen) -> tuple[dict, dict]:
    """(model params incl. the also-trained ones, adapters-only tree)."""
    base = self._base(frozen)
    if TRAINED not in trainable:
      return base, trainable
    rest = {k: v for k, v in trainable.items() if k != TRAINED}
    return tree.merge(base, trainable[TRAINED]), rest

  def _base(self, frozen) -> dict:
    if not self._scales:  # restored without init(): recompute the scales
      for m, (r, alpha) in self.targets(frozen).items():
        self._scales[m] = self.scale(r, alpha)
    return {k: v for k, v in frozen.items() if k != EXTRA}

  def adapters_for(self, trainable, frozen) -> dict:
    """The seam's adapters tree from the trainable + method-owned trees."""
    del frozen
    return trainable

  def assemble(self, trainable, frozen, rng=None):
    base, trainable = self._model_params(trainable, frozen)
    adapters = self.adapters_for(trainable, frozen)
    if rng is None or not self.cfg.dropout:
      return base, adapters
    flat = tree.flatten(adapters)
    n_layers = jax.tree.leaves(base["layers"])[0].shape[0] \
        if "layers" in base else 0
    for i, m in enumerate(sorted(self._scales)):
      key = jax.random.fold_in(rng, i)
      flat[m + "/dropout_key"] = (jax.random.split(key, n_layers)
                                  if m.startswith("layers/") else key)
    return base, tree.unflatten(flat)

  def reference(self, trainable, frozen):
    del trainable
    self._no_trained_reference()
    return self._base(frozen), None

  def _no_trained_reference(self):
    if self.cfg.also_trainable:
      raise errors.ConfigError(
          "config.peft.also_trainable: the base model is then trained too, "
          "so there is no frozen reference model for config.loss.name")

  def merged(self, trainable, frozen):
    base, trainable = self._model_params(trainable, frozen)
    flat = tree.flatten(base)
    ad = tree.flatten(self.adapters_for(trainable, frozen))
    for m, s in self._scales.items():
      mine = {k.rsplit("/", 1)[1]: v for k, v in ad.items()
              if k.rsplit("/", 1)[0] == m}
      flat[m + "/kernel"] = merge_kernel(flat[m + "/kernel"], mine, s)
    return tree.unflatten(flat)

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    if self.cfg.also_trainable:
      return False  # PEFT's modules_to_save form is not written
    peft_format.export_adapter(self, trainable, frozen, model_cfg, out_dir)
    return True

  def axes(self, model_axes):
    flat = tree.flatten(model_axes, tree.is_axes)
    out = {}
    for m in self.targets(model_axes):
      *lead, ax_in, ax_out = flat[m + "/kernel"]
      for k, v in self.module_axes(lead, ax_in, ax_out).items():
        out[f"{m}/{k}"] = v
    t_axes = tree.unflatten(out)
    extra = self.extra_axes(t_axes)
    f_axes = dict(model_axes, **({EXTRA: extra} if extra else {}))
    if self.cfg.also_trainable:
      self._check_trained(flat)
      trained, f_axes = tree.split(f_axes, self._is_trained,
                                   is_leaf=tree.is_axes)
      t_axes = dict(t_axes, **{TRAINED: trained})
    return t_axes, f_axes


register("lora")(Lora)


@register("rslora")
class RsLora(Lora):
  """rsLoRA: s = alpha / sqrt(r), stable across ranks."""
  sqrt_scaling = True


@register("dora")
class Dora(Lora):
  """DoRA: LoRA direction plus a learned per-output magnitude."""

  def init_module(self, key, w, r, s):
    ad, _ = super().init_module(key, w, r, s)
    # B = 0, so ||W + s·A B||_c = ||W||_c and the model starts at the base.
    ad["magnitude"] = lowrank.col_norm(w).astype(w.dtype)
    return ad, None

  def module_axes(self, lead, ax_in, ax_out):
    return dict(super().module_axes(lead, ax_in, ax_out),
                magnitude=(*lead, ax_out))


class _Residual(Lora):
  """Inits that move the principal part of W into A, B (W = W_res + sAB)."""

  def extra_init(self, rng, params, adapters):
    del rng, params
    return {"init": jax.tree.map(jnp.copy, adapters)}

  def extra_axes(self, adapter_axes):
    return {"init": adapter_axes}

  def reference(self, trainable, frozen):
    del trainable  # W_res + s·A0 B0 = W, the base model before training.
    self._no_trained_reference()
    return self._base(frozen), frozen[EXTRA]["init"]


@register("pissa")
class Pissa(_Residual):
  """PiSSA; `peft.svd_niter` > 0 selects the fast randomized SVD."""

  def init_module(self, key, w, r, s):
    a, b, res = lowrank.pissa(w, r, s, key=key, niter=self.cfg.svd_niter)
    return {"lora_a": a.astype(w.dtype), "lora_b": b.astype(w.dtype)}, res


@register("olora")
class Olora(_Residual):
  """OLoRA: orthonormal B from a QR of the weight."""

  def init_module(self, key, w, r, s):
    del key
    a, b, res = lowrank.olora(w, r, s)
    return {"lora_a": a.astype(w.dtype), "lora_b": b.astype(w.dtype)}, res


@register("vera")
class Vera(Lora):
  """VeRA: shared frozen random A/B, trainable scaling vectors."""

  def init_module(self, key, w, r, s):
    del key, s
    *lead, _, d_out = w.shape
    return {"vera_lambda_d": jnp.full((*lead, r), self.cfg.vera_d_init,
                                      w.dtype),
            "vera_lambda_b": jnp.zeros((*lead, d_out), w.dtype)}, None

  def module_axes(self, lead, ax_in, ax_out):
    del ax_in
    return {"vera_lambda_d": (*lead, "rank"),
            "vera_lambda_b": (*lead, ax_out)}

  def extra_init(self, rng, params, adapters):
    del adapters
    flat = tree.flatten(params)
    shapes = [flat[m + "/kernel"].shape[-2:] for m in self._scales]
    d_in, d_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    r, dtype = self.cfg.rank, flat[next(iter(self._scales)) + "/kernel"].dtype
    k_a, k_b = jax.random.split(rng)
    # PEFT's kaiming_uniform(a=sqrt 5) on [r, in] and [out, r]: bound
    # 1/sqrt(fan_in) with fan_in = in and r.
    return {"vera_a": lowrank.kaiming_a(k_a, d_in, r, (), dtype),
            "vera_b": jax.random.uniform(k_b, (r, d_out), dtype,
                                         -1 / math.sqrt(r), 1 / math.sqrt(r))}

  def extra_axes(self, adapter_axes):
    del adapter_axes
    return {"vera_a": (None, "rank"), "vera_b": ("rank", None)}

  def adapters_for(self, trainable, frozen):
    shared, base = frozen[EXTRA], tree.flatten(frozen)
    flat = tree.flatten(trainable)
    for m in self._scales:
      *lead, d_in, d_out = base[m + "/kernel"].shape
      a = shared["vera_a"][:d_in]  # Slices of the shared pair, as PEFT.
      b = shared["vera_b"][:, :d_out]
      flat[m + "/vera_a"] = jnp.broadcast_to(a, (*lead, *a.shape))
      flat[m + "/vera_b"] = jnp.broadcast_to(b, (*lead, *b.shape))
    return tree.unflatten(flat)


def loraplus_lr_groups(ratio: float = 16.0) -> tuple[tuple[str, float], ...]:
  """LoRA+ (Hayou et al. 2024, arXiv 2402.12354; PEFT
  `optimizers/loraplus.py`): B learns `ratio` x faster than A (the paper
  suggests ~16). Append to `config.optim.lr_groups`, e.g.
  `optim.lr_groups = peft.loraplus_lr_groups(16.0)`; works with any
  LoRA-family method whose adapters have `lora_b` leaves."""
  return ((r"(.*/)?lora_b", float(ratio)),)
