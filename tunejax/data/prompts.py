"""(prompt ids, reference answer) lists for generation-based eval and RL."""
from __future__ import annotations

import json
from typing import Any

from absl import logging

from tunejax import errors
from tunejax.data import formats, sources
from tunejax.data.config import DataConfig


def _chat_prompt(row: dict, tok, cfg: DataConfig) -> tuple[list[int], str]:
  messages = row.get(cfg.messages_field)
  if not isinstance(messages, list) or not messages or not isinstance(
      messages[-1], dict) or messages[-1].get("role") != "assistant":
    raise formats.RowError(f"field {cfg.messages_field!r}: expected messages "
                           "ending with an assistant turn")
  from tunejax import tokenizers  # pylint: disable=g-import-not-at-top
  segments = tokenizers.chat_segments(tok, messages[:-1], style=cfg.chat_style,
                                      add_generation_prompt=True)
  return [i for ids, _ in segments for i in ids], messages[-1]["content"]


def _prompt_answer(row: Any, tok, cfg: DataConfig) -> dict[str, Any]:
  if isinstance(row, str):
    try:
      row = json.loads(row)
    except json.JSONDecodeError as e:
      raise formats.RowError(f"invalid JSON ({e.msg})") from None
  if not isinstance(row, dict):
    raise formats.RowError(f"expected a JSON object, got {type(row).__name__}")
  if cfg.format == "chat":
    prompt_ids, answer = _chat_prompt(row, tok, cfg)
    return {"prompt_ids": prompt_ids, "prompt": tok.decode(prompt_ids),
            "answer": answer}
  prompt = formats.str_field(row, cfg.prompt_field)
  field = (cfg.answer_field if cfg.answer_field in row or
           cfg.format == "prompt_answer" else cfg.completion_field)
  answer = formats.str_field(row, field, "answer")
  bos = [tok.bos_id] if cfg.add_bos and tok.bos_id is not None else []
  return {"prompt_ids": bos + list(tok.encode(prompt)), "prompt": prompt,
          "answer": answer}


def load_prompt_answers(cfg: DataConfig, tokenizer, limit: int | None = None,
                        *, process_index: int = 0, process_count: int = 1
                        ) -> list[dict[str, Any]]:
  """`[{'prompt_ids', 'prompt', 'answer'}]` in file order (no shuffle).

  Works for prompt_answer and prompt_completion rows (answer = the answer
  field, else the completion) and chat rows (prompt = every turn before the
  final assistant turn plus the generation prompt; answer = that turn).
  Bad rows follow `cfg.bad_rows`. `limit` counts this process's examples.
  """
  source = sources.open_source(cfg)
  out, skipped = [], 0
  for i in range(process_index, len(source), process_count):
    if limit is not None and len(out) >= limit:
      break
    origin, payload = source[i]
    try:
      out.append(_prompt_answer(payload, tokenizer, cfg))
    except formats.RowError as e:
      if cfg.bad_rows == "error":
        raise errors.DataError(f"{origin}: {e}") from None
      skipped += 1
      if skipped <= 5:
        logging.warning("skipping bad data row %s: %s", origin, e)
  if not out:
    raise errors.DataError(f"data.path={cfg.path!r}: no usable prompt/answer "
                           f"rows ({skipped} bad)")
  return out
