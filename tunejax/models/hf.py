"""Load Hugging Face checkpoint directories and export to them.

`load` reads config.json and (sharded) safetensors through memmaps; with
`shardings` every tensor is placed shard by shard with
`jax.make_array_from_callback`, so no host ever holds a gathered copy.
`save_hf` writes config.json + safetensors that transformers loads, into a
temp dir that is renamed at the end (nothing half-written).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tunejax import errors, host
from tunejax import tree as tree_lib
from tunejax.models import hf_config
from tunejax.models import safetensors_io
from tunejax.models.config import ModelConfig
from tunejax.models.params import param_specs

_INDEX = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.ModelError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise errors.ModelError(f"{path}: invalid JSON ({e})") from None


def _open_tensors(path: str) -> dict[str, safetensors_io.SafetensorsFile]:
  """{HF tensor name: file holding it} for a checkpoint directory."""
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    weight_map = _read_json(index).get("weight_map", {})
    files = {f: safetensors_io.SafetensorsFile(os.path.join(path, f))
             for f in sorted(set(weight_map.values()))}
    return {name: files[f] for name, f in weight_map.items()}
  paths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not paths:
    raise errors.ModelError(f"{path}: no *.safetensors files")
  out = {}
  for p in paths:
    f = safetensors_io.SafetensorsFile(p)
    out.update({k: f for k in f.keys()})
  return out


def _prefix(names) -> str:
  """'model.' or the prefix of a multimodal wrapper's language model."""
  for n in names:
    if n.endswith("embed_tokens.weight"):
      return n[:-len("embed_tokens.weight")]
  return "model."


def _tensor_reader(cfg: ModelConfig, files, path: str, name: str,
                   hf_name: str, transpose: bool, dtype) -> Callable:
  """Returns read(index) -> np.ndarray for tunejax param `name`.

  Checks existence and shape first, naming the file and tensor on error.
  """
  spec = param_specs(cfg)[name]
  layered = name.startswith("layers/")
  shape = spec.shape[1:] if layered else spec.shape
  want = tuple(reversed(shape)) if transpose else shape
  hf_names = ([hf_name.format(i=i) for i in range(cfg.n_layers)]
              if layered else [hf_name])
  for n in hf_names:
    if n not in files:
      raise errors.ModelError(f"{path}: missing tensor '{n}'")
    if files[n].shape(n) != want:
      raise errors.ModelError(
          f"{files[n].path}: tensor '{n}' has shape {files[n].shape(n)}, "
          f"expected {want}")

  def one(n, idx):
    t = files[n].get(n)
    t = t.T if transpose else t
    return np.asarray(t[idx], dtype=dtype)

  def read(index=None):
    index = tuple(index) if index is not None else (slice(None),) * len(
        spec.shape)
    if not layered:
      return one(hf_names[0], index)
    picked = range(cfg.n_layers)[index[0]]
    return np.stack([one(hf_names[i], index[1:]) for i in picked])

  return read


def load_hf(path: str, dtype: str | None = None, *,
            shardings=None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from an HF checkpoint directory."""
  cfg_path = os.path.join(path, "config.json")
  cfg = hf_config.config_from_hf(_read_json(cfg_path), cfg_path, dtype)
  files = _open_tensors(path)
  prefix = _prefix(files)
  np_dtype = jnp.dtype(cfg.param_dtype)
  flat_shardings = {}
  if shardings is not None:
    flat_shardings = {
        "/".join(str(k.key) for k in p): s for p, s in
        jax.tree_util.tree_flatten_with_path(shardings)[0]}
  params: dict[str, Any] = {}
  for name, (hf_name, transpose) in hf_config.tensor_map(cfg).items():
    if hf_name.startswith("model."):
      hf_name = prefix + hf_name[len("model."):]
    read = _tensor_reader(cfg, files, path, name, hf_name, transpose,
                          np_dtype)
    if name in flat_shardings:
      shape = param_specs(cfg)[name].shape
      params[name] = jax.make_array_from_callback(shape, flat_shardings[name],
                                                  read)
    else:
      params[name] = jnp.asarray(read())
  return cfg, tree_lib.unflatten(params)


_NOT_A_CHECKPOINT = ("{}: not a checkpoint directory, .gguf file or known "
                     "alias ('gemma3-270m')")


def _is_gguf(path) -> bool:
  return path == "gemma3-270m" or str(path).endswith(".gguf")


def load_config(path: str, dtype: str | None = None) -> ModelConfig:
  """The ModelConfig of an HF directory, `.gguf` file or alias, reading no
  tensors (compile-only checks of models too large for this machine)."""
  if _is_gguf(path):
    from tunejax.models import gguf  # pylint: disable=import-outside-toplevel
    cfg = gguf.config_from_gguf(gguf.read_gguf(gguf.resolve_path(path)))
    return cfg if dtype is None else cfg.replace(param_dtype=dtype,
                                                 dtype=dtype)
  if not os.path.isdir(path):
    raise errors.ModelError(_NOT_A_CHECKPOINT.format(path))
  cfg_path = os.path.join(path, "config.json")
  return hf_config.config_from_hf(_read_json(cfg_path), cfg_path, dtype)


def load(path: str, dtype: str | None = None, *,
         shardings=None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from an HF directory, a `.gguf` file or an alias.

  `dtype` ('float32' | 'bfloat16') sets the param and compute dtype (default:
  the checkpoint's). `shardings`, a tree like the params of `Sharding`s,
  places each tensor directly on its shards.
  """
  if _is_gguf(path):
    from tunejax.models import gguf  # pylint: disable=import-outside-toplevel
    cfg, params = gguf.load_gguf(path, dtype)
    if shardings is not None:
      params = jax.device_put(params, shardings)
  elif not os.path.isdir(path):
    raise errors.ModelError(_NOT_A_CHECKPOINT.format(path))
  else:
    cfg, params = load_hf(path, dtype, shardings=shardings)
  # The loader's freed temporaries would otherwise stay resident.
  host.release_freed_memory()
  return cfg, params


def _hf_tensors(cfg: ModelConfig, params: dict):
  """Yields (HF name, numpy array) in checkpoint order, one at a time."""
  flat = {"/".join(str(k.key) for k in p): x for p, x in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, (hf_name, transpose) in hf_config.tensor_map(cfg).items():
    if name not in flat:
      raise errors.ModelError(f"save_hf: params have no '{name}'")
    x = np.asarray(jax.device_get(flat[name]))
    parts = ([(hf_name.format(i=i), x[i]) for i in range(cfg.n_layers)]
             if name.startswith("layers/") else [(hf_name, x)])
    for n, t in parts:
      yield n, np.ascontiguousarray(t.T if transpose else t)


def save_hf(cfg: ModelConfig, params: dict, out_dir: str, *,
            max_shard_bytes: int = 2 << 30) -> None:
  """Writes config.json + model*.safetensors loadable by transformers."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir), dir=parent)
  try:
    written: list[tuple[str, list[str]]] = []  # (temp file, tensor names)

    def flush(shard):
      fname = os.path.join(tmp, f"part-{len(written):05d}")
      safetensors_io.write(fname, shard)
      written.append((fname, list(shard)))

    current, size, total = {}, 0, 0
    for name, t in _hf_tensors(cfg, params):
      if current and size + t.nbytes > max_shard_bytes:
        flush(current)  # Written as soon as full, so memory stays bounded.
        current, size = {}, 0
      current[name] = t
      size += t.nbytes
      total += t.nbytes
    flush(current)
    weight_map = {}
    for i, (part, names) in enumerate(written):
      fname = ("model.safetensors" if len(written) == 1 else
               f"model-{i + 1:05d}-of-{len(written):05d}.safetensors")
      os.rename(part, os.path.join(tmp, fname))
      weight_map.update({n: fname for n in names})
    if len(written) > 1:
      with open(os.path.join(tmp, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config.config_to_hf(cfg), f, indent=2)
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _replace_dir(src: str, dst: str) -> None:
  """Renames `src` to `dst`, moving an existing `dst` out of the way first."""
  old = None
  if os.path.exists(dst):
    old = dst + ".old-" + os.path.basename(src)
    os.rename(dst, old)
  os.rename(src, dst)
  if old:
    shutil.rmtree(old, ignore_errors=True)
