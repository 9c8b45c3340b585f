"""A sentencepiece tokenizer rebuilt from a GGUF vocabulary, cached on disk.

GGUF `tokenizer.ggml.model == 'llama'` vocabularies are sentencepiece BPE
models flattened into three arrays (tokens, scores, types). Rebuilding the
ModelProto needs two fixes (reference/gemma3-270m.md section 3):
  1. llama.cpp's converter types `<unk>` CONTROL; sentencepiece needs
     UNKNOWN, otherwise `unk_id()` is -1 and unknown pieces map to -1.
  2. USER_DEFINED pieces were stored with plain spaces instead of U+2581, so
     runs of spaces would never match them.
Building the proto from 262k pieces takes seconds, so the result is cached
under ~/.cache/tunejax keyed by the file's path, size and mtime.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from tunejax import errors
from tunejax.tokenizers._tokenizer import Tokenizer, from_sentencepiece

_CACHE_VERSION = 1
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def is_gguf_source(path: str) -> bool:
  from tunejax.models import gguf
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


def build_proto(path: str, md: dict) -> tuple[bytes, dict]:
  """(serialized ModelProto, tokenizer info) from GGUF metadata."""
  kind = md.get("tokenizer.ggml.model")
  if kind != "llama":
    raise errors.ModelError(
        f"{path}: GGUF tokenizer model {kind!r} is not supported (only "
        "'llama', i.e. sentencepiece); load the HF tokenizer.json instead")
  try:
    tokens = md["tokenizer.ggml.tokens"]
    scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  except KeyError as e:
    raise errors.ModelError(f"{path}: missing metadata {e.args[0]}") from e
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
  info = {"bos_id": ids["bos"], "eos_id": ids["eos"],
          "pad_id": ids["padding"],
          "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", True)),
          "chat_template": md.get("tokenizer.chat_template")}
  return proto.SerializeToString(), info


def _cached(path: str) -> tuple[bytes, dict]:
  """The proto and info for `path`, from the cache or built and cached."""
  stem = os.path.join(cache_dir(), f"gguf-tokenizer-{_cache_key(path)}")
  try:
    with open(stem + ".json", encoding="utf-8") as f:
      info = json.load(f)
    with open(stem + ".model", "rb") as f:
      return f.read(), info
  except (OSError, ValueError):
    pass
  from tunejax.models import gguf
  proto, info = build_proto(path, gguf.read_gguf(path).metadata)
  try:
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    # The .json is written last: its presence means the .model is complete.
    _write_atomic(stem + ".model", proto)
    _write_atomic(stem + ".json", json.dumps(info).encode())
  except OSError:
    pass  # A read-only cache only costs the rebuild next time.
  return proto, info


def load(path: str) -> Tokenizer:
  """The tokenizer of a GGUF file (or the alias 'gemma3-270m')."""
  from tunejax.models import gguf
  path = gguf.resolve_path(path)
  if not os.path.exists(path):
    raise errors.ModelError(f"{path}: no such GGUF file")
  proto, info = _cached(path)
  # Unpickling reloads through the cache instead of carrying 5 MB.
  return from_sentencepiece(proto, name=path,
                            rebuild=functools.partial(load, path), **info)
