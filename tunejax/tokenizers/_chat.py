"""Chat formatting as role-tagged token chunks.

A conversation is rendered as text pieces, each tagged with the role it
belongs to: message content gets its message's role, scaffolding (BOS, role
headers, separators) gets 'template', and the end-of-turn token that closes an
assistant message gets 'assistant' so a model trained on assistant chunks
learns to stop. Content is tokenized as plain text (a user cannot inject
control tokens); scaffolding is tokenized with special tokens as ids.

Built-in styles ('gemma', 'llama3', 'chatml') are written out in Python; a
Jinja chat template (tokenizer_config.json) is rendered with jinja2 and cut at
message boundaries found by rendering once with unique sentinel contents.
"""
from __future__ import annotations

import datetime
import functools
import re
from typing import Callable, Sequence

import jinja2
from jinja2 import sandbox

from tunejax import errors
from tunejax.tokenizers._tokenizer import Tokenizer

TEMPLATE = "template"
Piece = tuple[str, str, bool]  # (text, role, parse special tokens)
Message = dict

# Style -> (start-of-turn token that identifies it, end-of-turn token).
_STYLE_TOKENS = {
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
CHAT_STYLES = tuple(_STYLE_TOKENS)


def _check_messages(messages: Sequence[Message]) -> None:
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or (
        not isinstance(m.get("content"), str)):
      raise errors.DataError(
          f"chat message {i}: expected {{'role': str, 'content': str}}, "
          f"got {m!r:.80}")


def _bos_text(tok: Tokenizer) -> str:
  if tok.bos_id is None:
    return ""
  return tok.decode([tok.bos_id])


def _end(role: str, eot: str) -> Piece:
  # The assistant's end-of-turn token is a training target; others are not.
  return (eot, "assistant" if role == "assistant" else TEMPLATE, True)


def _gemma(tok: Tokenizer, messages: Sequence[Message],
           add_generation_prompt: bool) -> list[Piece]:
  # Gemma 3's template: no system turn; the system text is prepended to the
  # first user turn followed by a blank line. Contents are trimmed.
  pieces: list[Piece] = [(_bos_text(tok), TEMPLATE, True)]
  system = None
  if messages and messages[0]["role"] == "system":
    system, messages = messages[0]["content"], messages[1:]
  for i, m in enumerate(messages):
    role = "model" if m["role"] == "assistant" else m["role"]
    pieces.append((f"<start_of_turn>{role}\n", TEMPLATE, True))
    if i == 0 and system is not None:
      pieces += [(system, "system", False), ("\n\n", TEMPLATE, True)]
    pieces.append((m["content"].strip(), m["role"], False))
    pieces += [_end(m["role"], "<end_of_turn>"), ("\n", TEMPLATE, True)]
  if add_generation_prompt:
    pieces.append(("<start_of_turn>model\n", TEMPLATE, True))
  return pieces


def _llama3(tok: Tokenizer, messages: Sequence[Message],
            add_generation_prompt: bool) -> list[Piece]:
  pieces: list[Piece] = [(_bos_text(tok), TEMPLATE, True)]
  for m in messages:
    pieces += [
        (f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", TEMPLATE,
         True),
        (m["content"].strip(), m["role"], False),
        _end(m["role"], "<|eot_id|>")]
  if add_generation_prompt:
    pieces.append(("<|start_header_id|>assistant<|end_header_id|>\n\n",
                   TEMPLATE, True))
  return pieces


def _chatml(tok: Tokenizer, messages: Sequence[Message],
            add_generation_prompt: bool) -> list[Piece]:
  del tok  # ChatML has no BOS.
  pieces: list[Piece] = []
  for m in messages:
    pieces += [(f"<|im_start|>{m['role']}\n", TEMPLATE, True),
               (m["content"], m["role"], False),
               _end(m["role"], "<|im_end|>"), ("\n", TEMPLATE, True)]
  if add_generation_prompt:
    pieces.append(("<|im_start|>assistant\n", TEMPLATE, True))
  return pieces


_STYLES: dict[str, Callable[..., list[Piece]]] = {
    "gemma": _gemma, "llama3": _llama3, "chatml": _chatml}


def _raise_exception(message):
  raise errors.DataError(f"chat template: {message}")


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  """Compiles a template once (data pipelines render one per row)."""
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=["jinja2.ext.loopcontrols"])
  env.globals.update(raise_exception=_raise_exception,
                     strftime_now=_strftime_now)
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise errors.ConfigError(f"chat template: {type(e).__name__}: {e}") from e


def _jinja_render(template: str, tok: Tokenizer, messages: Sequence[Message],
                  add_generation_prompt: bool) -> str:
  special = lambda i: tok.decode([i]) if i is not None else ""
  try:
    return _compile(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=special(tok.bos_id), eos_token=special(tok.eos_id),
        pad_token=special(tok.pad_id))
  except jinja2.TemplateError as e:
    raise errors.ConfigError(f"chat template: {type(e).__name__}: {e}") from e


def _jinja(template: str, tok: Tokenizer, messages: Sequence[Message],
           add_generation_prompt: bool) -> list[Piece]:
  """Renders a Jinja template and cuts it at the message contents."""
  # Letters only, so `| trim`, `.strip()` and escaping leave them intact.
  sentinels = [f"TJXSENTINEL{i}QZ" for i in range(len(messages))]
  masked = [dict(m, content=s) for m, s in zip(messages, sentinels)]
  text = _jinja_render(template, tok, masked, add_generation_prompt)
  real = _jinja_render(template, tok, messages, add_generation_prompt)
  parts = re.split(r"(TJXSENTINEL\d+QZ)", text)
  for strip in (False, True):  # Templates may or may not trim contents.
    pieces: list[Piece] = []
    for part in parts:
      hit = re.fullmatch(r"TJXSENTINEL(\d+)QZ", part)
      if hit:
        m = messages[int(hit.group(1))]
        content = m["content"].strip() if strip else m["content"]
        pieces.append((content, m["role"], False))
      elif part:
        pieces.append((part, TEMPLATE, True))
    if "".join(p[0] for p in pieces) == real:
      return _split_assistant_end(tok, pieces)
  raise errors.ConfigError(
      "chat template: cannot locate message boundaries (it transforms "
      "message contents other than by trimming)")


def _split_assistant_end(tok: Tokenizer, pieces: list[Piece]) -> list[Piece]:
  """Moves the special token that follows an assistant message into it."""
  out: list[Piece] = []
  for text, role, special in pieces:
    after_content = out and out[-1][1] == "assistant" and not out[-1][2]
    if role == TEMPLATE and after_content:
      head = tok.split_special(text)
      if head and isinstance(head[0], int):
        eot = tok.decode([head[0]])
        out.append((eot, "assistant", True))
        text = text[len(eot):]
    if text:
      out.append((text, role, special))
  return out


def _detect_style(tok: Tokenizer) -> str:
  # getattr: toy tokenizers (tokenizers.byte) have no specials at all.
  specials = getattr(tok, "special_tokens", {})
  for style, (start, _) in _STYLE_TOKENS.items():
    if start in specials:
      return style
  raise errors.ConfigError(
      f"tokenizer {getattr(tok, 'name', type(tok).__name__)}: no chat "
      f"template and no known chat tokens; pass style= one of "
      f"{list(CHAT_STYLES)} or template=")


def _pieces(tok, messages, style, template, add_generation_prompt):
  _check_messages(messages)
  if template is None and style is None:
    template = getattr(tok, "chat_template", None)
    if template is None:
      style = _detect_style(tok)
  if style is not None:
    if style not in _STYLES:
      raise errors.ConfigError(
          f"chat style {style!r}: expected one of {list(CHAT_STYLES)}")
    return _STYLES[style](tok, messages, add_generation_prompt)
  return _jinja(template, tok, messages, add_generation_prompt)


def chat_segments(tokenizer: Tokenizer, messages: Sequence[Message], *,
                  style: str | None = None, template: str | None = None,
                  add_generation_prompt: bool = False
                  ) -> list[tuple[list[int], str]]:
  """Token-id chunks of a conversation, each tagged with its role.

  Args:
    tokenizer: a `Tokenizer`.
    messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...].
    style: 'gemma' | 'llama3' | 'chatml'; overrides the tokenizer's template.
    template: a Jinja chat template string; overrides `style`.
      With neither, the tokenizer's own template is used, else the style is
      detected from its special tokens.
    add_generation_prompt: end with the header of an assistant turn.

  Returns:
    [(ids, role)] in order, role in the message roles or 'template';
    adjacent chunks of the same role are merged. The assistant's
    end-of-turn token belongs to the assistant chunk.
  """
  out: list[tuple[list[int], str]] = []
  for text, role, special in _pieces(tokenizer, messages, style, template,
                                     add_generation_prompt):
    ids = (tokenizer.encode_with_special(text) if special
           else tokenizer.encode(text))
    if not ids:
      continue
    if out and out[-1][1] == role:
      out[-1][0].extend(ids)
    else:
      out.append((ids, role))
  return out


def render_chat_text(tokenizer: Tokenizer, messages: Sequence[Message], *,
                     style: str | None = None, template: str | None = None,
                     add_generation_prompt: bool = False) -> str:
  """The conversation as one string (what `chat_segments` tokenizes)."""
  return "".join(p[0] for p in _pieces(tokenizer, messages, style, template,
                                       add_generation_prompt))


def render_chat(tokenizer: Tokenizer, messages: Sequence[Message], *,
                style: str | None = None, template: str | None = None,
                add_generation_prompt: bool = True) -> list[int]:
  """Prompt ids for inference: exactly the training tokenization."""
  segments = chat_segments(tokenizer, messages, style=style,
                           template=template,
                           add_generation_prompt=add_generation_prompt)
  return [i for ids, _ in segments for i in ids]


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
  """EOS plus every known end-of-turn token in the vocabulary."""
  ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  for _, end in _STYLE_TOKENS.values():
    tid = tokenizer.token_id(end)
    if tid is not None and tid not in ids:
      ids.append(tid)
  return ids
