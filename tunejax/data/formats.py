"""Rows -> documents: token ids with per-target loss mask and weights.

A document is the causal-LM view of one example, already shifted:
`(tokens_N, targets_N, loss_mask_N, weights_N)` with `targets[i]` the token
after `tokens[i]`. Shifting here, per document and before packing, is what
guarantees that no position of a packed row predicts across a document
boundary. A unit is a tuple of documents that must stay together: one for the
LM formats, `(chosen, rejected)` for preference pairs.

Formats (field names configurable, see `DataConfig`):
  text:              [bos] text [eos]; every target trained.
  prompt_completion: [bos] prompt | completion [eos]; targets in the
                     completion trained ('all': every target).
  prompt_answer:     the same with the reference answer as completion.
  chat:              `tunejax.tokenizers.chat_segments` renders the messages
                     with the model's template; assistant segments trained
                     ('last': only the final assistant turn, 'all': all).
  preference:        [bos] prompt | chosen [eos] and [bos] prompt |
                     rejected [eos], responses trained.
Prompt and response are tokenized separately and concatenated, so the
boundary is exact (the usual convention of TRL-style completion-only loss).
"""
from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from tunejax.data.config import DataConfig

Doc = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Unit = tuple[Doc, ...]


class BadRow(NamedTuple):
  origin: str
  reason: str


class RowError(Exception):
  """A row cannot be used; the message is the reason."""


class _Seq:
  """Token ids with a parallel 'is trained' flag and weight per token."""

  def __init__(self):
    self.ids: list[int] = []
    self.train: list[bool] = []
    self.weight: list[float] = []

  def add(self, ids: Sequence[int], train: bool, weight: float = 1.0):
    self.ids.extend(ids)
    self.train.extend([train] * len(ids))
    self.weight.extend([weight] * len(ids))


def _field(row: dict, name: str) -> Any:
  if name not in row:
    raise RowError(f"missing field {name!r}")
  return row[name]


def str_field(row: dict, name: str, what: str = "") -> str:
  value = _field(row, name)
  if not isinstance(value, str):
    raise RowError(f"field {name!r}: expected a string, got "
                   f"{type(value).__name__}")
  if what and not value.strip():
    raise RowError(f"empty {what} (field {name!r})")
  return value


def _spans(row: dict, cfg: DataConfig) -> list[tuple[int, int, float]]:
  """`[start, end, weight]` character spans, validated and sorted."""
  if not cfg.spans_field or cfg.spans_field not in row:
    return []
  raw = row[cfg.spans_field]
  try:
    spans = sorted((int(s), int(e), float(w)) for s, e, w in raw)
  except (TypeError, ValueError):
    raise RowError(f"field {cfg.spans_field!r}: expected a list of "
                   "[start, end, weight]") from None
  for (s0, e0, _), (s1, _, _) in zip(spans, spans[1:]):
    if s1 < e0:
      raise RowError(f"field {cfg.spans_field!r}: overlapping spans")
  if spans and (spans[0][0] < 0 or any(s > e for s, e, _ in spans)):
    raise RowError(f"field {cfg.spans_field!r}: bad span bounds")
  return spans


def _add_weighted(seq: _Seq, tok, text: str, spans, train: bool):
  """Encodes `text` piecewise at span boundaries so weights align exactly."""
  if spans and spans[-1][1] > len(text):
    raise RowError(f"span end {spans[-1][1]} is past the text ({len(text)} "
                   "chars)")
  pos = 0
  for start, end, weight in spans:
    if start > pos:
      seq.add(tok.encode(text[pos:start]), train)
    seq.add(tok.encode(text[start:end]), train, weight)
    pos = end
  if pos < len(text) or not spans:
    seq.add(tok.encode(text[pos:]), train)


def _row_weight(row: dict, cfg: DataConfig) -> float:
  if not cfg.weights_field:
    return 1.0
  value = row.get(cfg.weights_field, 1.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RowError(f"field {cfg.weights_field!r}: expected a number")
  return float(value)


def _prompt_response(tok, cfg, prompt: str, response: str, spans,
                     train_prompt: bool) -> _Seq:
  seq = _Seq()
  if cfg.add_bos and tok.bos_id is not None:
    seq.add([tok.bos_id], train_prompt)
  if prompt:
    seq.add(tok.encode(prompt), train_prompt)
  _add_weighted(seq, tok, response, spans, True)
  if cfg.add_eos and tok.eos_id is not None:
    seq.add([tok.eos_id], True)
  return seq


def _chat(row: dict, tok, cfg: DataConfig) -> _Seq:
  messages = _field(row, cfg.messages_field)
  if not isinstance(messages, list) or not messages:
    raise RowError(f"field {cfg.messages_field!r}: expected a non-empty list "
                   "of messages")
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      raise RowError(f"field {cfg.messages_field!r}[{i}]: expected "
                     "{'role': str, 'content': str}")
  if not any(m["role"] == "assistant" for m in messages):
    raise RowError(f"field {cfg.messages_field!r}: no assistant message")
  from tunejax import tokenizers  # pylint: disable=g-import-not-at-top
  segments = tokenizers.chat_segments(tok, messages, style=cfg.chat_style)
  roles = [role for _, role in segments]
  trained = [role == "assistant" for role in roles]
  if cfg.train_on == "all":
    trained = [True] * len(roles)
  elif cfg.train_on == "last":
    last = max(i for i, r in enumerate(roles) if r == "assistant")
    first = last
    while first > 0 and roles[first - 1] == "assistant":
      first -= 1
    trained = [first <= i <= last for i in range(len(roles))]
  seq = _Seq()
  for (ids, _), train in zip(segments, trained):
    seq.add(ids, train)
  return seq


def _lm_seqs(row: dict, tok, cfg: DataConfig) -> list[_Seq]:
  """The token sequences (one per parallel document) of a row."""
  fmt = cfg.format
  if fmt == "text":
    return [_prompt_response(tok, cfg, "", str_field(row, cfg.text_field,
                                                      "text"),
                             _spans(row, cfg), True)]
  if fmt == "chat":
    return [_chat(row, tok, cfg)]
  prompt = str_field(row, cfg.prompt_field)
  if fmt == "preference":
    chosen = str_field(row, cfg.chosen_field, "chosen response")
    rejected = str_field(row, cfg.rejected_field, "rejected response")
    return [_prompt_response(tok, cfg, prompt, r, _spans(row, cfg), False)
            for r in (chosen, rejected)]
  field = cfg.answer_field if fmt == "prompt_answer" else cfg.completion_field
  what = "answer" if fmt == "prompt_answer" else "completion"
  response = str_field(row, field, what)
  return [_prompt_response(tok, cfg, prompt, response, _spans(row, cfg),
                           cfg.train_on == "all")]


def _windows(n: int, cfg: DataConfig) -> list[slice]:
  """Token windows of a sequence of `n` ids that fit `seq_len` targets."""
  limit = cfg.seq_len + 1
  if n <= limit:
    return [slice(0, n)]
  if cfg.truncation == "drop":
    raise RowError(f"too long: {n - 1} targets > seq_len={cfg.seq_len} "
                   "(set data.truncation to 'left', 'right' or 'split')")
  if cfg.truncation == "right":
    return [slice(0, limit)]
  if cfg.truncation == "left":
    return [slice(n - limit, n)]
  # 'split': chunks overlap by one id so that every target occurs once.
  return [slice(s, min(s + limit, n)) for s in range(0, n - 1, cfg.seq_len)]


def _doc(seq: _Seq, sl: slice, scale: float) -> Doc:
  ids = np.asarray(seq.ids[sl], np.int32)
  mask = np.asarray(seq.train[sl][1:], np.float32)
  weights = np.asarray(seq.weight[sl][1:], np.float32) * mask * scale
  return ids[:-1], ids[1:], mask, weights


def format_row(row: Any, tok, cfg: DataConfig) -> list[Unit]:
  """One parsed row -> units; raises RowError with the reason if unusable."""
  if isinstance(row, str):
    try:
      row = json.loads(row)
    except json.JSONDecodeError as e:
      raise RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict):
    raise RowError(f"expected a JSON object, got {type(row).__name__}")
  scale = _row_weight(row, cfg)
  seqs = _lm_seqs(row, tok, cfg)
  if len(seqs) == 1:
    units = [(_doc(seqs[0], sl, scale),) for sl in _windows(len(seqs[0].ids),
                                                           cfg)]
  else:  # Pairs are truncated alike, never split, so they stay aligned.
    units = [tuple(_doc(s, _windows(len(s.ids), cfg)[0], scale)
                   for s in seqs)]
  units = [u for u in units if all(d[2].any() for d in u)]
  if not units:
    raise RowError("no trained target tokens (after truncation)")
  return units


def make_formatter(cfg: DataConfig, tok) -> Callable[[tuple[str, Any]],
                                                     list[Unit] | BadRow]:
  """A grain map function: `(origin, payload)` -> units, or a BadRow."""
  def fn(record):
    origin, payload = record
    try:
      return format_row(payload, tok, cfg)
    except RowError as e:
      return BadRow(origin, str(e))
  return fn
