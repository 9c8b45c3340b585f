"""Hugging Face PEFT adapter format: export and import.

An adapter directory holds `adapter_config.json` and
`adapter_model.safetensors` with PEFT's key names, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in];
tunejax's A is its transpose), `...lora_B.weight` ([out, r]),
`...lora_magnitude_vector` (DoRA), `...vera_lambda_{b,d}` and the shared
`base_model.vera_{A,B}` (VeRA, `save_projection`). Layer-stacked tunejax
leaves become one tensor per layer.

PiSSA, OLoRA and CorDA train on a residual base W_res = W − s·A0 B0, which
PEFT's plain loader cannot know. They are exported the way PEFT converts them
(`path_initial_model_for_weight_conversion`): a rank-2r LoRA on the
original W with A' = [A | A0], B' = [B ; −B0], so W + s·A' B' = W_res + s·A B.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np

from tunejax import errors, tree
from tunejax.models import hf_config, safetensors_io

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_LORA_KEYS = {"lora_a": ("lora_A.weight", True),
              "lora_b": ("lora_B.weight", True),
              "magnitude": ("lora_magnitude_vector", False),
              "vera_lambda_d": ("vera_lambda_d", False),
              "vera_lambda_b": ("vera_lambda_b", False)}


def hf_module_names(model_cfg, module: str) -> list[str]:
  """HF module paths of a tunejax module, one per layer if layer-stacked."""
  hf_name, _ = hf_config.tensor_map(model_cfg)[module + "/kernel"]
  name = hf_name[: -len(".weight")]
  if module.startswith("layers/"):
    return [name.format(i=i) for i in range(model_cfg.n_layers)]
  return [name]


def _short(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def _module_tensors(model_cfg, module: str, leaves: dict) -> dict:
  """{PEFT key: numpy array} for one module's adapter leaves."""
  out = {}
  for i, name in enumerate(hf_module_names(model_cfg, module)):
    for k, x in leaves.items():
      suffix, transpose = _LORA_KEYS[k]
      x = np.asarray(x, np.float32)
      x = x[i] if module.startswith("layers/") else x
      out[f"{PREFIX}{name}.{suffix}"] = x.T if transpose else x
  return out


def _residual_to_plain(ad: dict, init: dict) -> dict:
  """[A | A0], [B ; −B0]: the rank-2r LoRA on the original weight."""
  return {"lora_a": np.concatenate([np.asarray(ad["lora_a"]),
                                    np.asarray(init["lora_a"])], -1),
          "lora_b": np.concatenate([np.asarray(ad["lora_b"]),
                                    -np.asarray(init["lora_b"])], -2)}


def adapter_tensors(method, trainable, frozen, model_cfg):
  """(adapter_config dict, {PEFT key: float32 array}) for a LoRA-family
  method's state."""
  cfg = method.cfg
  per_module = {m: {} for m in method.targets(frozen)}
  for name, x in tree.flatten(trainable).items():
    m, leaf = name.rsplit("/", 1)
    per_module[m][leaf] = x
  # Residual-base inits (PiSSA, OLoRA, CorDA) keep their initial adapters.
  residual = "init" in frozen.get("peft", {})
  if residual:
    init = tree.flatten(frozen["peft"]["init"])
    for m, ad in per_module.items():
      per_module[m] = _residual_to_plain(
          ad, {k: init[f"{m}/{k}"] for k in ("lora_a", "lora_b")})
  tensors = {}
  for m, leaves in per_module.items():
    tensors.update(_module_tensors(model_cfg, m, leaves))
  if cfg.method == "vera":
    tensors[f"{PREFIX[:-len('model.')]}vera_A"] = np.asarray(
        frozen["peft"]["vera_a"], np.float32).T
    tensors[f"{PREFIX[:-len('model.')]}vera_B"] = np.asarray(
        frozen["peft"]["vera_b"], np.float32).T
  return _config(method, frozen, model_cfg, residual), tensors


def _config(method, frozen, model_cfg, residual: bool) -> dict:
  cfg = method.cfg
  sqrt = method.sqrt_scaling or cfg.rslora
  short = sorted({_short(n) for m in method.targets(frozen)
                  for n in hf_module_names(model_cfg, m)})
  if cfg.method == "vera":
    return {"peft_type": "VERA", "r": cfg.rank, "target_modules": short,
            "projection_prng_key": 0, "save_projection": True,
            "vera_dropout": cfg.dropout, "d_initial": cfg.vera_d_init,
            "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": None, "modules_to_save": None,
            "init_weights": True, "layers_to_transform": None,
            "layers_pattern": None}
  # Residual inits export rank 2r at the same scale s.
  grow = lambda r, a: (2 * r, a * (math.sqrt(2) if sqrt else 2.0)) \
      if residual else (r, a)
  r0, a0 = grow(cfg.rank, cfg.alpha)
  ranks, alphas = {}, {}
  for m, (r, a) in method.targets(frozen).items():
    r, a = grow(r, a)
    for n in hf_module_names(model_cfg, m):
      if r != r0:
        ranks[re.escape(n)] = r
      if a != a0:
        alphas[re.escape(n)] = a
  return {"peft_type": "LORA", "r": r0, "lora_alpha": a0,
          "target_modules": short, "rank_pattern": ranks,
          "alpha_pattern": alphas, "use_rslora": sqrt,
          "use_dora": cfg.method == "dora", "lora_dropout": cfg.dropout,
          "init_lora_weights": True, "fan_in_fan_out": False, "bias": "none",
          "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
          "modules_to_save": None, "layers_to_transform": None,
          "layers_pattern": None}


def write_dir(out_dir: str, files: dict[str, dict | dict[str, np.ndarray]]):
  """Writes {file name: JSON dict or {name: array}} (safetensors for names
  ending in '.safetensors') into `out_dir` atomically: into a temp dir
  renamed at the end."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=os.path.dirname(out_dir))
  try:
    for name, content in files.items():
      if name.endswith(".safetensors"):
        safetensors_io.write(os.path.join(tmp, name), content)
      else:
        with open(os.path.join(tmp, name), "w") as f:
          json.dump(content, f, indent=2)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_adapter(config: dict, tensors: dict, out_dir: str):
  """A PEFT adapter dir from (adapter_config dict, {PEFT key: array})."""
  write_dir(out_dir, {WEIGHTS: tensors, CONFIG: config})


def export_adapter(method, trainable, frozen, model_cfg, out_dir: str):
  """Writes a LoRA-family method's PEFT adapter dir (atomically)."""
  write_adapter(*adapter_tensors(method, trainable, frozen, model_cfg),
                out_dir)


def _pattern_value(pattern: dict, name: str, default):
  """PEFT's rule: a key matches a module name ending in '.key' or equal."""
  for key, v in pattern.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return v
  return default


def modules_by_short(model_cfg, params) -> dict[str, str]:
  """{HF short module name (e.g. 'k_proj'): tunejax module path}."""
  out = {}
  for name in tree.flatten(params):
    if name.endswith("/kernel") and name != "embed/embedding":
      m = name[: -len("/kernel")]
      out.setdefault(_short(hf_module_names(model_cfg, m)[0]), m)
  return out


def import_adapter(path: str, model_cfg, params):
  """A PEFT LoRA / rsLoRA / DoRA / VeRA / prompt tuning / prefix tuning /
  (IA)^3 adapter dir -> (PeftConfig, trainable, frozen) on the base
  `params` (the model it was trained on)."""
  # pylint: disable=g-import-not-at-top
  from tunejax.peft import prompt_format
  from tunejax.peft.base import PeftConfig
  cfg_path = os.path.join(path, CONFIG)
  try:
    with open(cfg_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.CheckpointError(f"{cfg_path}: cannot read ({e})") from None
  kind = hf.get("peft_type")
  known = ("LORA", "VERA") + tuple(prompt_format.IMPORTERS)
  if kind not in known:
    raise errors.CheckpointError(
        f"{cfg_path}: peft_type '{kind}' is not supported {known}")
  files = safetensors_io.SafetensorsFile(os.path.join(path, WEIGHTS))
  if kind in prompt_format.IMPORTERS:
    return prompt_format.IMPORTERS[kind](hf, files, model_cfg, params)
  flat_params = tree.flatten(params)
  by_short = modules_by_short(model_cfg, params)
  leaves = ("vera_lambda_d", "vera_lambda_b") if kind == "VERA" else (
      ("lora_a", "lora_b") + (("magnitude",) if hf.get("use_dora") else ()))
  trainable, overrides = {}, []
  r0, a0 = hf["r"], float(hf.get("lora_alpha", 0.0))
  for short in hf["target_modules"]:
    if short not in by_short:
      raise errors.CheckpointError(
          f"{cfg_path}: target module '{short}' is not in this model")
    m = by_short[short]
    names = hf_module_names(model_cfg, m)
    for leaf in leaves:
      suffix, transpose = _LORA_KEYS[leaf]
      per_layer = []
      for n in names:
        key = f"{PREFIX}{n}.{suffix}"
        if key not in files.keys():
          raise errors.CheckpointError(
              f"{files.path}: missing tensor '{key}'")
        x = np.asarray(files.get(key), np.float32)
        per_layer.append(x.T if transpose else x)
      stacked = np.stack(per_layer) if m.startswith("layers/") else \
          per_layer[0]
      trainable[f"{m}/{leaf}"] = stacked.astype(
          flat_params[m + "/kernel"].dtype)
    if kind == "LORA":
      r = _pattern_value(hf.get("rank_pattern", {}), names[0], r0)
      a = _pattern_value(hf.get("alpha_pattern", {}), names[0], a0)
      if (r, a) != (r0, a0):
        overrides.append((re.escape(m), int(r), float(a)))
  frozen = dict(params)
  if kind == "VERA":
    frozen["peft"] = {
        "vera_a": np.asarray(files.get("base_model.vera_A")).T,
        "vera_b": np.asarray(files.get("base_model.vera_B")).T}
    method = "vera"
  else:
    method = "dora" if hf.get("use_dora") else "lora"
  pcfg = PeftConfig(
      method=method, rank=int(r0), alpha=a0,
      rslora=bool(hf.get("use_rslora", False)),
      dropout=float(hf.get("lora_dropout", hf.get("vera_dropout", 0.0))),
      targets=tuple(re.escape(by_short[s]) for s in hf["target_modules"]),
      overrides=tuple(overrides),
      vera_d_init=float(hf.get("d_initial", 0.1)))
  return pcfg, tree.unflatten(trainable), frozen


# tunejax's own adapter form, for methods PEFT cannot represent (DePT,
# LoFiT's head biases, post-RoPE (IA)^3): the trainable tree under its
# '/'-joined names plus the PeftConfig that reads it.
NATIVE_CONFIG = "tunejax_adapter.json"
NATIVE_WEIGHTS = "adapter.safetensors"


def export_native(peft_cfg, trainable, out_dir: str):
  """Writes `out_dir` (tunejax_adapter.json + adapter.safetensors)."""
  tensors = {n: np.asarray(x) for n, x in tree.flatten(trainable).items()}
  write_dir(out_dir, {NATIVE_WEIGHTS: tensors,
                      NATIVE_CONFIG: {"peft": dataclasses.asdict(peft_cfg)}})


def import_native(path: str):
  """A tunejax adapter dir -> (PeftConfig, trainable)."""
  # pylint: disable=g-import-not-at-top
  from tunejax import config as config_lib
  from tunejax.peft.base import PeftConfig
  cfg_path = os.path.join(path, NATIVE_CONFIG)
  try:
    with open(cfg_path) as f:
      section = json.load(f)["peft"]
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise errors.CheckpointError(f"{cfg_path}: cannot read ({e})") from None
  pcfg = config_lib.build(PeftConfig, section, "peft")
  files = safetensors_io.SafetensorsFile(os.path.join(path, NATIVE_WEIGHTS))
  return pcfg, tree.unflatten({k: files.get(k) for k in files.keys()})
