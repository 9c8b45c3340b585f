"""load_prompt_answers: prompts for generation eval and RL."""
import json

import pytest

from tunejax import errors
from tunejax import tokenizers
from tunejax.data import DataConfig
from tunejax.data import load_prompt_answers
from tunejax.data import synthetic


def test_write_jsonl_and_load_prompt_answers(tmp_path, byte_tok):
  examples = synthetic.make_examples("reverse3", 12, 0)
  path = synthetic.write_jsonl(str(tmp_path / "sub" / "r.jsonl"), examples)
  assert [json.loads(l) for l in open(path)] == examples
  cfg = DataConfig(source="jsonl", path=path, format="prompt_answer")
  got = load_prompt_answers(cfg, byte_tok, limit=5)
  assert len(got) == 5
  for g, e in zip(got, examples):
    assert g["prompt"] == e["prompt"] and g["answer"] == e["answer"]
    assert g["prompt_ids"] == [byte_tok.bos_id] + byte_tok.encode(e["prompt"])
  shards = [load_prompt_answers(cfg, byte_tok, process_index=p,
                                process_count=3) for p in range(3)]
  assert sorted(g["prompt"] for s in shards for g in s) == sorted(
      e["prompt"] for e in examples)



def test_chat_prompt_is_the_generation_prompt(tmp_path, chat_tok):
  messages = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": messages}) + "\n")
  cfg = DataConfig(source="jsonl", path=str(path), format="chat",
                   chat_style="gemma")
  (got,) = load_prompt_answers(cfg, chat_tok)
  assert got["answer"] == "4"
  assert got["prompt_ids"] == tokenizers.render_chat(
      chat_tok, messages[:-1], style="gemma", add_generation_prompt=True)


def test_bad_prompt_rows(tmp_path, byte_tok):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
  cfg = DataConfig(source="jsonl", path=str(path), format="prompt_answer")
  assert len(load_prompt_answers(cfg, byte_tok)) == 1
  with pytest.raises(errors.DataError, match=r"p.jsonl:2: missing field"):
    load_prompt_answers(DataConfig(source="jsonl", path=str(path),
                                   format="prompt_answer", bad_rows="error"),
                        byte_tok)
  path.write_text('{"prompt": "a"}\n')
  with pytest.raises(errors.DataError, match="no usable prompt/answer rows"):
    load_prompt_answers(cfg, byte_tok)
