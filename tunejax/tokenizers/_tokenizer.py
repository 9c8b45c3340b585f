"""One `Tokenizer` over two backends: sentencepiece and HF `tokenizers`.

Both backends are driven the same way: the backend only ever encodes plain
text (special-token strings inside it are *not* turned into control ids, so
user content cannot inject `<end_of_turn>`), and `encode_with_special` splits
the text on the special-token strings itself and inserts their ids. That keeps
the two backends bit-for-bit consistent in how specials are handled.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import sentencepiece as spm
import tokenizers as hf_tokenizers
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from tunejax import errors

# Names used when a tokenizer.json comes without a tokenizer_config.json.
_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "<eos>", "</s>",
              "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class Tokenizer:
  """Text <-> token ids, with special tokens and an optional chat template.

  Attributes:
    bos_id, eos_id, pad_id: ids (pad falls back to eos when the vocabulary
      has no pad token; padded positions are masked out anyway).
    vocab_size: number of ids.
    special_tokens: {string: id} of the tokens that `encode` never produces
      from text but `encode_with_special` does.
    chat_template: a Jinja chat template string, or None.
    add_bos: whether the model expects BOS first (a hint for callers).

  Tokenizers pickle (for data-loader workers) by rebuilding from their
  source.
  """

  def __init__(self, *, encode_fn: Callable[[str], list[int]],
               decode_fn: Callable[[Sequence[int]], str],
               special_tokens: dict[str, int], vocab_size: int,
               bos_id: int | None, eos_id: int | None, pad_id: int | None,
               chat_template: str | None = None, add_bos: bool = True,
               name: str = "",
               rebuild: Callable[[], Tokenizer] | None = None):
    self._encode_fn = encode_fn
    self._decode_fn = decode_fn
    self.special_tokens = dict(special_tokens)
    self._special_by_id = {i: s for s, i in self.special_tokens.items()}
    # Matching by length (longest first) keeps the special split linear in
    # the text even with thousands of specials (Gemma has 6k `<unusedN>`).
    self._special_lengths = sorted({len(s) for s in self.special_tokens},
                                   reverse=True)
    self._special_first = {s[0] for s in self.special_tokens if s}
    self.vocab_size = vocab_size
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else eos_id
    self.chat_template = chat_template
    self.add_bos = add_bos
    self.name = name
    # How to rebuild this tokenizer: the backend closures do not pickle.
    self._rebuild = rebuild

  def __reduce__(self):
    if self._rebuild is None:
      raise TypeError(f"tokenizer {self.name} cannot be pickled")
    return (self._rebuild, ())

  def __repr__(self):
    return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Plain-text ids; special-token strings stay ordinary text."""
    ids = self._encode_fn(text) if text else []
    return self._with_bos(ids, add_bos)

  def encode_with_special(self, text: str, *,
                          add_bos: bool = False) -> list[int]:
    """Like `encode`, but special-token strings become their ids."""
    ids: list[int] = []
    for part in self.split_special(text):
      if isinstance(part, int):
        ids.append(part)
      else:
        ids.extend(self._encode_fn(part))
    return self._with_bos(ids, add_bos)

  def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
    """Text of `ids`; special tokens are rendered as their strings unless
    `skip_special`."""
    out, run = [], []
    for i in (int(x) for x in ids):
      if i in self._special_by_id:
        if run:
          out.append(self._decode_fn(run))
          run = []
        if not skip_special:
          out.append(self._special_by_id[i])
      else:
        run.append(i)
    if run:
      out.append(self._decode_fn(run))
    return "".join(out)

  def token_id(self, token: str) -> int | None:
    """Id of a special token string, or None."""
    return self.special_tokens.get(token)

  def split_special(self, text: str) -> list[str | int]:
    """Splits text into plain-text pieces and special-token ids."""
    parts: list[str | int] = []
    start = i = 0
    n = len(text)
    while i < n:
      match = None
      if text[i] in self._special_first:
        for length in self._special_lengths:
          cand = text[i:i + length]
          if cand in self.special_tokens:
            match = cand
            break
      if match is None:
        i += 1
        continue
      if start < i:
        parts.append(text[start:i])
      parts.append(self.special_tokens[match])
      i += len(match)
      start = i
    if start < n:
      parts.append(text[start:])
    return parts

  def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
    if add_bos:
      if self.bos_id is None:
        raise errors.ModelError(f"tokenizer {self.name}: has no BOS token")
      return [self.bos_id] + ids
    return ids


def from_sentencepiece(proto_bytes: bytes, *, name: str,
                       bos_id: int | None = None, eos_id: int | None = None,
                       pad_id: int | None = None,
                       chat_template: str | None = None,
                       add_bos: bool = True,
                       rebuild: Callable[[], Tokenizer] | None = None
                       ) -> Tokenizer:
  """A Tokenizer over a serialized sentencepiece ModelProto."""
  sp = spm.SentencePieceProcessor(model_proto=proto_bytes)
  specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
              if sp.is_control(i)}

  def ids_or_none(value, default):
    value = default if value is None else value
    return None if value is None or value < 0 else int(value)

  if rebuild is None:
    rebuild = functools.partial(
        from_sentencepiece, proto_bytes, name=name, bos_id=bos_id,
        eos_id=eos_id, pad_id=pad_id, chat_template=chat_template,
        add_bos=add_bos)
  return Tokenizer(
      encode_fn=lambda text: list(sp.encode(text)),
      decode_fn=lambda ids: sp.decode(list(ids)),
      special_tokens=specials, vocab_size=sp.get_piece_size(),
      bos_id=ids_or_none(bos_id, sp.bos_id()),
      eos_id=ids_or_none(eos_id, sp.eos_id()),
      pad_id=ids_or_none(pad_id, sp.pad_id()),
      chat_template=chat_template, add_bos=add_bos, name=name,
      rebuild=rebuild)


def _token_content(value) -> str | None:
  # tokenizer_config.json stores tokens as strings or AddedToken dicts.
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.ModelError(f"{path}: cannot read JSON ({e})") from e


def _chat_template_of(config: dict, directory: str | None) -> str | None:
  """The default chat template from tokenizer_config or chat_template.jinja."""
  template = config.get("chat_template")
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}]
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default") or next(iter(named.values()), None)
  if template is None and directory:
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        template = f.read()
  return template


def from_hf(tok: hf_tokenizers.Tokenizer, *, name: str, bos_id: int | None,
            eos_id: int | None, pad_id: int | None,
            chat_template: str | None, add_bos: bool,
            rebuild: Callable[[], Tokenizer]) -> Tokenizer:
  """A Tokenizer over an HF `tokenizers.Tokenizer` (it is modified)."""
  # The backend must not parse specials itself (see the module docstring).
  tok.encode_special_tokens = True
  specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items()
              if t.special}
  return Tokenizer(
      encode_fn=lambda text: tok.encode(text, add_special_tokens=False).ids,
      decode_fn=lambda ids: tok.decode(list(ids), skip_special_tokens=False),
      special_tokens=specials, vocab_size=tok.get_vocab_size(),
      bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
      chat_template=chat_template, add_bos=add_bos, name=name,
      rebuild=rebuild)


def from_hf_json(path: str) -> Tokenizer:
  """A Tokenizer from an HF tokenizer.json (+ tokenizer_config.json next to
  it, when present)."""
  try:
    tok = hf_tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception.
    raise errors.ModelError(f"{path}: not a valid tokenizer.json ({e})") from e
  directory = os.path.dirname(os.path.abspath(path))
  config_path = os.path.join(directory, "tokenizer_config.json")
  config = _read_json(config_path) if os.path.exists(config_path) else {}

  def find(key, names):
    content = _token_content(config.get(key))
    if content is not None:
      tid = tok.token_to_id(content)
      if tid is None:
        raise errors.ModelError(
            f"{config_path}: {key} {content!r} is not in the vocabulary")
      return tid
    if key in config:  # Explicitly null: the model has none.
      return None
    return next((tok.token_to_id(n) for n in names
                 if tok.token_to_id(n) is not None), None)

  bos = find("bos_token", _BOS_NAMES)
  return from_hf(
      tok, name=path, bos_id=bos, eos_id=find("eos_token", _EOS_NAMES),
      pad_id=find("pad_token", _PAD_NAMES),
      chat_template=_chat_template_of(config, directory),
      add_bos=bool(config.get("add_bos_token", bos is not None)),
      rebuild=functools.partial(from_hf_json, path))


def from_sentencepiece_file(path: str) -> Tokenizer:
  """A Tokenizer from a sentencepiece `.model` file (tokenizer_config.json
  next to it, when present, supplies the chat template)."""
  try:
    with open(path, "rb") as f:
      proto = f.read()
    spm_pb2.ModelProto.FromString(proto)
  except Exception as e:  # protobuf DecodeError or OSError.
    raise errors.ModelError(
        f"{path}: not a sentencepiece model ({type(e).__name__}: {e})") from e
  directory = os.path.dirname(os.path.abspath(path))
  config_path = os.path.join(directory, "tokenizer_config.json")
  config = _read_json(config_path) if os.path.exists(config_path) else {}
  return from_sentencepiece(
      proto, name=path, chat_template=_chat_template_of(config, directory),
      add_bos=bool(config.get("add_bos_token", True)))
