"""Tokenizers rebuilt from a GGUF vocabulary, cached on disk.

GGUF `tokenizer.ggml.model == 'llama'` vocabularies are sentencepiece BPE
models flattened into three arrays (tokens, scores, types). Rebuilding the
ModelProto needs two fixes (reference/gemma3-270m.md section 3):
  1. llama.cpp's converter types `<unk>` CONTROL; sentencepiece needs
     UNKNOWN, otherwise `unk_id()` is -1 and unknown pieces map to -1.
  2. USER_DEFINED pieces were stored with plain spaces instead of U+2581, so
     runs of spaces would never match them.
`'gpt2'` vocabularies (Llama 3, Qwen) are byte-level BPEs (tokens + merges)
whose pre-tokenizer regex is named by `tokenizer.ggml.pre`; they become an HF
`tokenizers` model.

Building either from 262k pieces takes seconds, so the result (a serialized
ModelProto or tokenizer.json) is cached under ~/.cache/tunejax keyed by the
file's path, size and mtime.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile

from sentencepiece import sentencepiece_model_pb2 as spm_pb2
import tokenizers as hf_tokenizers

from tunejax import errors
# The GGUF reader lives with the model loader; this package is imported
# lazily from tokenizers.load, so models never import tokenizers.
from tunejax.models import gguf
from tunejax.tokenizers._tokenizer import Tokenizer
from tunejax.tokenizers._tokenizer import from_hf
from tunejax.tokenizers._tokenizer import from_sentencepiece

_CACHE_VERSION = 2
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
# tokenizer.ggml.pre -> the split regex of that model family (applied before
# byte-level mapping). 'default' / 'gpt-2' use ByteLevel's own GPT-2 regex.
_PRE_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                 r"\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
             r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def is_gguf_source(path: str) -> bool:
  return path in gguf.ALIASES or path.endswith(".gguf")


def cache_dir() -> str:
  """$TUNEJAX_CACHE, else $XDG_CACHE_HOME/tunejax, else ~/.cache/tunejax."""
  if os.environ.get("TUNEJAX_CACHE"):
    return os.environ["TUNEJAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "tunejax")


def _cache_key(path: str) -> str:
  st = os.stat(path)
  ident = f"{_CACHE_VERSION}:{os.path.realpath(path)}:{st.st_size}:" \
          f"{st.st_mtime_ns}"
  return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _write_atomic(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _field(path: str, md: dict, key: str):
  if f"tokenizer.ggml.{key}" not in md:
    raise errors.ModelError(f"{path}: missing metadata tokenizer.ggml.{key}")
  return md[f"tokenizer.ggml.{key}"]


def _info(md: dict, kind: str) -> dict:
  def tid(key):
    value = md.get(f"tokenizer.ggml.{key}_token_id", -1)
    return None if value < 0 else int(value)
  return {"kind": kind, "bos_id": tid("bos"), "eos_id": tid("eos"),
          "pad_id": tid("padding"),
          "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", True)),
          "chat_template": md.get("tokenizer.chat_template")}


def build(path: str, md: dict) -> tuple[bytes, dict]:
  """(serialized tokenizer, info) from GGUF metadata."""
  kind = md.get("tokenizer.ggml.model")
  if kind == "llama":
    return _build_spm(path, md), _info(md, "spm")
  if kind == "gpt2":
    return _build_bpe(path, md), _info(md, "bpe")
  raise errors.ModelError(
      f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'llama' "
      "and 'gpt2'); load the HF tokenizer.json instead")


def _build_bpe(path: str, md: dict) -> bytes:
  """tokenizer.json text of a GGUF byte-level BPE vocabulary."""
  tokens, merges = _field(path, md, "tokens"), _field(path, md, "merges")
  types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  pre = md.get("tokenizer.ggml.pre", "default")
  pt = hf_tokenizers.pre_tokenizers
  if pre in ("default", "gpt-2", "gpt2"):
    pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
  elif pre in _PRE_REGEX:
    pre_tokenizer = pt.Sequence([
        pt.Split(hf_tokenizers.Regex(_PRE_REGEX[pre]), behavior="isolated"),
        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise errors.ModelError(
        f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: "
        f"default, gpt-2, {', '.join(_PRE_REGEX)}); load the HF "
        "tokenizer.json instead")
  model = hf_tokenizers.models.BPE(
      vocab={t: i for i, t in enumerate(tokens)},
      merges=[tuple(m.split(" ", 1)) for m in merges],
      ignore_merges=pre == "llama-bpe")
  tok = hf_tokenizers.Tokenizer(model)
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  added = lambda t, special: hf_tokenizers.AddedToken(
      t, special=special, normalized=False)
  tok.add_special_tokens([added(t, True) for t, ty in zip(tokens, types)
                          if ty == _CONTROL])
  tok.add_tokens([added(t, False) for t, ty in zip(tokens, types)
                  if ty == _USER_DEFINED])
  return tok.to_str().encode()


def _build_spm(path: str, md: dict) -> bytes:
  """Serialized sentencepiece ModelProto of a GGUF 'llama' vocabulary."""
  tokens = _field(path, md, "tokens")
  scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  ids = {k: md.get(f"tokenizer.ggml.{k}_token_id", -1)
         for k in ("unknown", "bos", "eos", "padding")}
  proto = spm_pb2.ModelProto()
  for i, (piece, score, ttype) in enumerate(zip(tokens, scores, types)):
    if i == ids["unknown"]:
      ttype = _UNKNOWN  # Fix 1.
    elif ttype == _USER_DEFINED:
      piece = piece.replace(" ", "\u2581")  # Fix 2.
    proto.pieces.add(piece=piece, score=score, type=ttype)
  ts = proto.trainer_spec
  ts.model_type = spm_pb2.TrainerSpec.BPE
  ts.vocab_size = len(tokens)
  ts.byte_fallback = True
  ts.split_digits = True
  ts.allow_whitespace_only_pieces = True
  ts.unk_id, ts.bos_id = ids["unknown"], ids["bos"]
  ts.eos_id, ts.pad_id = ids["eos"], ids["padding"]
  ns = proto.normalizer_spec
  ns.name = "identity"
  ns.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return proto.SerializeToString()


def _cached(path: str) -> tuple[bytes, dict]:
  """The serialized tokenizer and info for `path`, from the cache or built
  and cached."""
  stem = os.path.join(cache_dir(), f"gguf-tokenizer-{_cache_key(path)}")
  try:
    with open(stem + ".info", encoding="utf-8") as f:
      info = json.load(f)
    with open(stem + ".bin", "rb") as f:
      return f.read(), info
  except (OSError, ValueError):
    pass
  payload, info = build(path, gguf.read_gguf(path).metadata)
  try:
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    # The .info is written last: its presence means the .bin is complete.
    _write_atomic(stem + ".bin", payload)
    _write_atomic(stem + ".info", json.dumps(info).encode())
  except OSError:
    pass  # A read-only cache only costs the rebuild next time.
  return payload, info


def load(path: str) -> Tokenizer:
  """The tokenizer of a GGUF file (or the alias 'gemma3-270m')."""
  path = gguf.resolve_path(path)
  if not os.path.exists(path):
    raise errors.ModelError(f"{path}: no such GGUF file")
  payload, info = _cached(path)
  # Unpickling reloads through the cache instead of carrying megabytes.
  rebuild = functools.partial(load, path)
  if info.pop("kind") == "spm":
    return from_sentencepiece(payload, name=path, rebuild=rebuild, **info)
  return from_hf(hf_tokenizers.Tokenizer.from_str(payload.decode()),
                 name=path, rebuild=rebuild, **info)
