"""QLoRA: LoRA over a frozen base stored block-quantised (NF4 or int8).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"
(arXiv 2305.14314, §3): every frozen linear kernel of the layer stack is
stored as 4-bit NormalFloat codes (or int8) with one absmax constant per
block of 64 values, and dequantised on use inside the PEFT seam; LoRA
adapters stay in the param dtype and are the only trainable tensors.

- NF4 (§3 and Appendix E): the 16 values of `NF4_CODE` (the paper's table;
  `nf4_code()` rebuilds them from normal quantiles). A value x of a block
  with absmax c is stored as the index of the code nearest to x / c, two
  indices per byte (0.5 byte/param).
- int8: round(127 · x / c) (1 byte/param); error ≤ c / 254.
- Double quantisation (§3): the fp32 absmax constants of each kernel are
  centred on their mean and quantised again with blocks of 256. The paper
  uses 8-bit floats for them; here they are symmetric int8 with an fp32
  scale per 256 constants (error ≤ scale / 254), which keeps the bound
  simple to state (a kernel with fewer than 256 blocks uses one group). Cost: 8/64 + 32/(64·256) bits/param instead of 32/64.

Only kernels under 'layers/' are quantised: the embedding and LM head are
read directly by the fused token-loss op, outside the seam, and QLoRA keeps
them in 16 bits as well.

Why not qwix: qwix quantises by intercepting Flax (NNX/Linen) module ops
and keeps `QArray`/`LoRAParam` objects inside the module graph; tunejax's
model is plain functions over nested dicts whose linears all pass through
one seam, so the quantised kernel is a plain dict pytree (it scans with the
layer stack and shards like any leaf) and dequantisation is a few lines in
the seam, with no extra dependency or module interception.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tunejax import errors, sharding, tree
from tunejax.peft import lora
from tunejax.peft.base import PeftConfig, register

FORMATS = ("nf4", "int8")
DQ_BLOCK = 256  # double-quantisation block of absmax constants

# Paper, Appendix E (also bitsandbytes' NF4 table).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


def nf4_code(offset: float = 0.9677083) -> np.ndarray:
  """NF4 from the paper's construction: quantiles of N(0, 1), 8 positive
  and 7 negative plus an exact zero, normalised to [-1, 1]
  (`offset` = ½(1/(2·15) + 1 − 1/(2·16)), the paper's symmetric-tail
  choice)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  pos = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  v = np.sort(np.concatenate([pos, [0.0], neg]))
  return (v / np.abs(v).max()).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Static layout of one quantised kernel (a seam field: hashable)."""
  fmt: str
  d_in: int
  d_out: int
  block: int
  double: bool
  dtype: str = "float32"  # the original kernel's dtype (merge, export)


def _blocks(x, block: int):
  """[*lead, in, out] -> [*lead, n_blocks, block] (zero-padded)."""
  lead = x.shape[:-2]
  flat = x.reshape(*lead, -1)
  pad = (-flat.shape[-1]) % block
  flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)])
  return flat.reshape(*lead, -1, block)


def _absmax_quant(c, block: int):
  """Symmetric int8 of `c` [*lead, n] in blocks: (q, scale [*lead, nb]).

  Kernels with fewer than `block` constants use one block of all of them
  (no padding overhead on small matrices)."""
  cb = _blocks(c[..., None], min(block, c.shape[-1]))  # [*lead, nb, block]
  scale = jnp.max(jnp.abs(cb), axis=-1)
  q = jnp.round(cb / jnp.where(scale == 0, 1.0, scale)[..., None] * 127)
  return q.astype(jnp.int8), scale


def _absmax_dequant(q, scale, n: int):
  c = q.astype(jnp.float32) / 127 * scale[..., None]
  return c.reshape(*c.shape[:-2], -1)[..., :n]


def quantize(w, spec: QuantSpec) -> dict:
  """Kernel [*lead, in, out] -> dict of quantised leaves (all [*lead, ...])."""
  xb = _blocks(w.astype(jnp.float32), spec.block)
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  x = xb / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  if spec.fmt == "nf4":
    code = jnp.asarray(NF4_CODE)
    idx = jnp.searchsorted((code[1:] + code[:-1]) / 2, x).astype(jnp.uint8)
    pairs = idx.reshape(*idx.shape[:-1], -1, 2)
    codes = pairs[..., 0] | (pairs[..., 1] << 4)  # two codes per byte
  else:
    codes = jnp.round(x * 127).astype(jnp.int8)
  if not spec.double:
    return {"codes": codes, "absmax": absmax}
  mean = jnp.mean(absmax, axis=-1)
  q, scale = _absmax_quant(absmax - mean[..., None], DQ_BLOCK)
  return {"codes": codes, "absmax_q": q, "absmax_scale": scale,
          "absmax_mean": mean}


def absmax(qw: dict, spec: QuantSpec):
  """The per-block absmax constants (dequantised if double-quantised)."""
  if not spec.double:
    return qw["absmax"]
  n = qw["codes"].shape[-2]
  return (_absmax_dequant(qw["absmax_q"], qw["absmax_scale"], n)
          + qw["absmax_mean"][..., None])


def dequantize(qw: dict, spec: QuantSpec, dtype=jnp.float32):
  """Quantised dict -> kernel [*lead, in, out] in `dtype`."""
  codes = qw["codes"]
  if spec.fmt == "nf4":
    idx = jnp.stack([codes & 0xF, codes >> 4], axis=-1)
    x = jnp.asarray(NF4_CODE)[idx.reshape(*codes.shape[:-1], -1)]
  else:
    x = codes.astype(jnp.float32) / 127
  w = x * absmax(qw, spec)[..., None]
  lead = codes.shape[:-2]
  w = w.reshape(*lead, -1)[..., :spec.d_in * spec.d_out]
  return w.reshape(*lead, spec.d_in, spec.d_out).astype(dtype)


def _quant_axes(lead_axes, spec: QuantSpec) -> dict:
  blk = (*lead_axes, None, None)
  if not spec.double:
    return {"codes": blk, "absmax": (*lead_axes, None)}
  return {"codes": blk, "absmax_q": blk, "absmax_scale": (*lead_axes, None),
          "absmax_mean": tuple(lead_axes)}


@dataclasses.dataclass(frozen=True)
class QLoraSeam(lora.LoraSeam):
  """LoRA seam that first dequantises dict-valued (quantised) kernels."""
  quant: tuple[tuple[str, QuantSpec], ...] = ()

  def linear(self, name, x, kernel, bias, adapters):
    if isinstance(kernel, dict):
      kernel = dequantize(kernel, dict(self.quant)[name], x.dtype)
    return super().linear(name, x, kernel, bias, adapters)


@register("qlora")
class QLora(lora.Lora):
  """LoRA on `peft.targets` over a quantised frozen layer stack."""

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.quant not in FORMATS:
      raise errors.ConfigError(
          f"config.peft.quant: unknown format '{cfg.quant}' (known: "
          f"{list(FORMATS)})")
    if cfg.quant_block < 2 or cfg.quant_block % 2:
      raise errors.ConfigError("config.peft.quant_block: must be even, >= 2")
    self._quant: dict[str, QuantSpec] = {}

  def _specs(self, flat_shapes) -> dict[str, QuantSpec]:
    return {n[:-len("/kernel")]: QuantSpec(
        self.cfg.quant, s.shape[-2], s.shape[-1], self.cfg.quant_block,
        self.cfg.quant_double, str(jnp.dtype(s.dtype)))
            for n, s in flat_shapes.items()
            if n.startswith("layers/") and n.endswith("/kernel")}

  @property
  def seam(self):
    return QLoraSeam(tuple(sorted(self._scales.items())), self.cfg.dropout,
                     tuple(sorted(self._quant.items())))

  def init(self, rng, params):
    adapters, frozen = super().init(rng, params)
    flat = tree.flatten(frozen)
    self._quant = self._specs(flat)
    for m, spec in self._quant.items():
      # Quantise a gathered copy (once, at init), like lowrank's SVDs.
      w = flat.pop(m + "/kernel")
      w = sharding.constrain(w, (None,) * w.ndim)
      for k, v in quantize(w, spec).items():
        flat[f"{m}/kernel/{k}"] = v
    return adapters, tree.unflatten(flat)

  def dequantized(self, frozen) -> dict:
    """`frozen` with plain float kernels (for merge / adapter export)."""
    def deq(node, path=""):
      if not isinstance(node, dict):
        return node
      if path.endswith("/kernel") and path[:-len("/kernel")] in self._quant:
        spec = self._quant[path[:-len("/kernel")]]
        return dequantize(node, spec, spec.dtype)
      return {k: deq(v, f"{path}/{k}" if path else k)
              for k, v in node.items()}
    return deq(frozen)

  def merged(self, trainable, frozen):
    return super().merged(trainable, self.dequantized(frozen))

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    return super().export_adapter(trainable, self.dequantized(frozen),
                                  model_cfg, out_dir)

  def axes(self, model_axes):
    t_axes, f_axes = super().axes(model_axes)
    if not self._quant:
      raise errors.ConfigError("peft 'qlora': axes() needs init() first")
    out = tree.flatten(f_axes, tree.is_axes)
    for m, spec in self._quant.items():
      lead = out.pop(m + "/kernel")[:-2]
      for k, v in _quant_axes(lead, spec).items():
        out[f"{m}/kernel/{k}"] = v
    return t_axes, tree.unflatten(out)


def bytes_per_param(spec: QuantSpec) -> float:
  """Storage of one quantised value, constants included (no padding)."""
  code = 0.5 if spec.fmt == "nf4" else 1.0
  if not spec.double:
    return code + 4 / spec.block
  return code + 1 / spec.block + 4 / (spec.block * DQ_BLOCK)


def half_gap(fmt: str) -> float:
  """Half the largest gap between adjacent codes (in units of absmax): the
  format's worst-case rounding error. Double quantisation adds the
  constant's own error |c − ĉ| (|code| ≤ 1)."""
  return (float(np.max(np.diff(NF4_CODE))) if fmt == "nf4" else 1 / 127) / 2
