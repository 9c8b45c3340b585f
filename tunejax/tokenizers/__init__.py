"""Tokenizers (sentencepiece, HF tokenizer.json, GGUF vocabularies) and chat
formatting.

    tok = tunejax.tokenizers.load("path/to/tokenizer.json" | "x.model" |
                                  "x.gguf" | "gemma3-270m" | directory)
    tok.encode("text", add_bos=True); tok.decode(ids)
    tunejax.tokenizers.chat_segments(tok, messages) -> [(ids, role), ...]
"""
from __future__ import annotations

import os

from tunejax import errors
from tunejax.tokenizers._chat import CHAT_STYLES
from tunejax.tokenizers._chat import chat_segments
from tunejax.tokenizers._chat import chat_stop_ids
from tunejax.tokenizers._chat import render_chat
from tunejax.tokenizers._chat import render_chat_text
from tunejax.tokenizers._tokenizer import Tokenizer
from tunejax.tokenizers._tokenizer import from_hf_json
from tunejax.tokenizers._tokenizer import from_sentencepiece_file

__all__ = ["CHAT_STYLES", "Tokenizer", "chat_segments", "chat_stop_ids",
           "load", "render_chat", "render_chat_text"]


def load(path: str) -> Tokenizer:
  """Loads a tokenizer from a file, a checkpoint directory or an alias.

  Args:
    path: a sentencepiece `.model`, an HF `tokenizer.json`, a `.gguf` file
      (its vocabulary), a directory holding `tokenizer.json` or
      `tokenizer.model` (with an optional tokenizer_config.json), or the
      alias 'gemma3-270m' (the `gemma3` extra).
  """
  path = os.fspath(path)
  from tunejax.tokenizers import _gguf  # Lazy: pulls in the GGUF reader.
  if _gguf.is_gguf_source(path):
    return _gguf.load(path)
  if os.path.isdir(path):
    for name, loader in (("tokenizer.json", from_hf_json),
                         ("tokenizer.model", from_sentencepiece_file)):
      if os.path.exists(os.path.join(path, name)):
        return loader(os.path.join(path, name))
    raise errors.ModelError(
        f"{path}: no tokenizer.json or tokenizer.model in this directory")
  if not os.path.exists(path):
    raise errors.ModelError(f"{path}: no such tokenizer file")
  if path.endswith(".json"):
    return from_hf_json(path)
  return from_sentencepiece_file(path)
