"""PEFT adapter format for soft prompts, prefixes and (IA)^3.

    PROMPT_TUNING   prompt_embeddings [P, D]
    PREFIX_TUNING   prompt_embeddings [P, n_layers·2·G·K]: per virtual
                    token, layer-major, then key / value, kv head, head dim
    IA3             base_model.model.<module>.ia3_l: [out, 1] (output
                    scaled) or [1, in] (`feedforward_modules`), per layer

PEFT saves a prefix trained with `prefix_projection` as the MLP's output
(`get_prompt_embedding_to_save`, read back with `inference_mode`), and so
do we; import gives the direct k/v prefix that MLP produces.
HF places the text after a prefix (positions P..), so only prefixes
trained with `prefix_shift_positions` are exported in this format.
"""
from __future__ import annotations

import re

import numpy as np

from tunejax import errors, tree
from tunejax.peft import peft_format
from tunejax.peft.base import PeftConfig

_COMMON = {"task_type": "CAUSAL_LM", "inference_mode": True,
           "base_model_name_or_path": None, "revision": None,
           "modules_to_save": None}
_KEY = "prompt_embeddings"


def _virtual(model_cfg, n: int, token_dim: int, heads: int) -> dict:
  return {**_COMMON, "num_virtual_tokens": n, "token_dim": token_dim,
          "num_attention_heads": heads, "num_layers": model_cfg.n_layers,
          "num_transformer_submodules": 1}


def prompt_tensors(embedding_PxD, model_cfg) -> tuple[dict, dict]:
  """(adapter_config, tensors) of a soft prompt [P, D]."""
  emb = np.asarray(embedding_PxD, np.float32)
  config = {**_virtual(model_cfg, emb.shape[0], emb.shape[1],
                       model_cfg.n_heads),
            "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None}
  return config, {_KEY: emb}


def prefix_tensors(k_NxPxGK, v_NxPxGK, model_cfg,
                   projection: int = 0) -> tuple[dict, dict]:
  """(adapter_config, tensors) of per-layer key/value prefixes (made by an
  MLP of hidden size `projection` if > 0)."""
  kv = np.stack([np.asarray(k_NxPxGK, np.float32),
                 np.asarray(v_NxPxGK, np.float32)], axis=2)  # [N, P, 2, GK]
  _, p, _, gk = kv.shape
  config = {**_virtual(model_cfg, p, gk, model_cfg.n_kv_heads),
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": projection > 0,
            "encoder_hidden_size": projection or gk, "init_weights": None}
  return config, {_KEY: kv.transpose(1, 0, 2, 3).reshape(p, -1)}


def _short_names(model_cfg, modules) -> list[str]:
  return sorted({peft_format.hf_module_names(model_cfg, m)[0].rsplit(".", 1)[-1]
                 for m in modules})


def ia3_tensors(targets: dict[str, bool], trainable,
                model_cfg) -> tuple[dict, dict]:
  """(adapter_config, tensors) of (IA)^3 vectors; `targets` maps module
  path -> input-scaled (`Ia3.targets`)."""
  flat, tensors = tree.flatten(trainable), {}
  for m, ff in targets.items():
    l = np.asarray(flat[m + "/ia3"], np.float32)
    for i, name in enumerate(peft_format.hf_module_names(model_cfg, m)):
      li = l[i] if m.startswith("layers/") else l
      tensors[f"{peft_format.PREFIX}{name}.ia3_l"] = (
          li[None, :] if ff else li[:, None])
  config = {**_COMMON, "peft_type": "IA3",
            "target_modules": _short_names(model_cfg, targets),
            "feedforward_modules": _short_names(
                model_cfg, [m for m, ff in targets.items() if ff]),
            "exclude_modules": None, "fan_in_fan_out": False,
            "init_ia3_weights": True}
  return config, tensors


def _embeddings(hf: dict, files) -> np.ndarray:
  if _KEY not in files.keys():
    raise errors.CheckpointError(f"{files.path}: missing tensor '{_KEY}'")
  x = np.asarray(files.get(_KEY), np.float32)
  if x.ndim != 2 or x.shape[0] != hf.get("num_virtual_tokens"):
    raise errors.CheckpointError(
        f"{files.path}: '{_KEY}' {x.shape} does not hold num_virtual_tokens="
        f"{hf.get('num_virtual_tokens')} rows")
  return x


def _import_prompt(hf, files, model_cfg, params):
  emb = _embeddings(hf, files)
  if emb.shape[1] != model_cfg.d_model:
    raise errors.CheckpointError(
        f"{files.path}: token_dim {emb.shape[1]} != the model's d_model "
        f"{model_cfg.d_model}")
  dtype = params["embed"]["embedding"].dtype
  pcfg = PeftConfig(method="prompt", n_virtual=emb.shape[0],
                    prompt_init="random")
  return pcfg, {"prompt": {"embedding": emb.astype(dtype)}}, params


def _import_prefix(hf, files, model_cfg, params):
  emb = _embeddings(hf, files)
  n, gk = model_cfg.n_layers, model_cfg.n_kv_heads * model_cfg.head_dim
  if emb.shape[1] != n * 2 * gk:
    raise errors.CheckpointError(
        f"{files.path}: '{_KEY}' width {emb.shape[1]} != n_layers·2·G·K = "
        f"{n * 2 * gk} of this model")
  kv = emb.reshape(-1, n, 2, gk).transpose(2, 1, 0, 3)
  dtype = params["embed"]["embedding"].dtype
  pcfg = PeftConfig(method="prefix", n_virtual=emb.shape[0])
  return pcfg, {"prefix": {"k": kv[0].astype(dtype),
                           "v": kv[1].astype(dtype)}}, params


def _import_ia3(hf, files, model_cfg, params):
  by_short = peft_format.modules_by_short(model_cfg, params)
  flat, out, ff = tree.flatten(params), {}, []
  shorts = hf.get("target_modules")
  if not isinstance(shorts, list):
    raise errors.CheckpointError(
        f"{files.path}: IA3 target_modules must be a list of module names")
  for short in shorts:
    if short not in by_short:
      raise errors.CheckpointError(
          f"{files.path}: target module '{short}' is not in this model")
    m = by_short[short]
    per_layer = []
    for name in peft_format.hf_module_names(model_cfg, m):
      key = f"{peft_format.PREFIX}{name}.ia3_l"
      if key not in files.keys():
        raise errors.CheckpointError(f"{files.path}: missing tensor '{key}'")
      per_layer.append(np.asarray(files.get(key), np.float32).reshape(-1))
    l = np.stack(per_layer) if m.startswith("layers/") else per_layer[0]
    out[m + "/ia3"] = l.astype(flat[m + "/kernel"].dtype)
    if short in (hf.get("feedforward_modules") or []):
      ff.append(re.escape(m))
  pcfg = PeftConfig(method="ia3",
                    ia3_targets=tuple(re.escape(by_short[s]) for s in shorts),
                    ia3_feedforward=tuple(ff))
  return pcfg, tree.unflatten(out), params


IMPORTERS = {"PROMPT_TUNING": _import_prompt, "PREFIX_TUNING": _import_prefix,
             "IA3": _import_ia3}
