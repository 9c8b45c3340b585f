"""Formats: which targets are trained, per format, checked by decoding."""
import dataclasses

import numpy as np
import pytest

from tunejax import tokenizers
from tunejax.data import DataConfig
from tunejax.data import formats

BASE = DataConfig(source="synthetic", seq_len=128)


def _cfg(**kw):
  return dataclasses.replace(BASE, **kw)


def _trained_text(tok, doc):
  tokens, targets, mask, _ = doc
  np.testing.assert_array_equal(tokens[1:], targets[:-1])  # shifted by one
  return tok.decode(targets[mask > 0].tolist())


def _one(row, tok, cfg):
  units = formats.format_row(row, tok, cfg)
  assert len(units) == 1
  return units[0]


def test_text_trains_every_target(byte_tok):
  (doc,) = _one({"text": "hello"}, byte_tok, _cfg(format="text"))
  want = [byte_tok.bos_id] + byte_tok.encode("hello") + [byte_tok.eos_id]
  np.testing.assert_array_equal(doc[0], want[:-1])
  np.testing.assert_array_equal(doc[1], want[1:])
  np.testing.assert_array_equal(doc[2], np.ones(len(want) - 1))
  np.testing.assert_array_equal(doc[3], np.ones(len(want) - 1))


@pytest.mark.parametrize("fmt,field", [("prompt_completion", "completion"),
                                       ("prompt_answer", "answer")])
def test_completion_only_loss(sp_tok, fmt, field):
  row = {"prompt": "12+34=", field: "46"}
  (doc,) = _one(row, sp_tok, _cfg(format=fmt))
  prompt_len = 1 + len(sp_tok.encode("12+34="))  # bos + prompt
  mask = doc[2]
  # The first trained target is the first completion token.
  assert mask[:prompt_len - 1].sum() == 0 and mask[prompt_len - 1:].all()
  assert _trained_text(sp_tok, doc) == "46"
  assert doc[1][-1] == sp_tok.eos_id and mask[-1] == 1
  (doc_all,) = _one(row, sp_tok, _cfg(format=fmt, train_on="all"))
  assert doc_all[2].all()


def test_preference_pairs_share_prompt(byte_tok):
  row = {"prompt": "Q:", "chosen": " yes", "rejected": " no way"}
  chosen, rejected = _one(row, byte_tok, _cfg(format="preference"))
  assert _trained_text(byte_tok, chosen) == " yes"
  assert _trained_text(byte_tok, rejected) == " no way"
  np.testing.assert_array_equal(chosen[0][:3], rejected[0][:3])  # bos Q :


def test_spans_and_row_weights(byte_tok):
  cfg = _cfg(format="prompt_completion", spans_field="spans",
             weights_field="w")
  row = {"prompt": "p", "completion": "abcdef", "spans": [[2, 4, 3.0]],
         "w": 0.5}
  (doc,) = _one(row, byte_tok, cfg)
  trained = doc[3][doc[2] > 0]
  # completion bytes a b c d e f then eos; 'cd' weighted 3, all scaled 0.5.
  np.testing.assert_allclose(trained, [0.5, 0.5, 1.5, 1.5, 0.5, 0.5, 0.5],
                             rtol=0, atol=0)
  assert (doc[3][doc[2] == 0] == 0).all()


def test_truncation_policies(byte_tok):
  text = "abcdefghij"  # bos + 10 + eos = 12 ids, 11 targets
  ids = [1] + byte_tok.encode(text) + [2]
  with pytest.raises(formats.RowError, match="too long"):
    formats.format_row({"text": text}, byte_tok, _cfg(seq_len=5))
  ((right,),) = formats.format_row({"text": text}, byte_tok,
                                   _cfg(seq_len=5, truncation="right"))
  np.testing.assert_array_equal(right[1], ids[1:6])
  ((left,),) = formats.format_row({"text": text}, byte_tok,
                                  _cfg(seq_len=5, truncation="left"))
  np.testing.assert_array_equal(left[1], ids[-5:])
  chunks = formats.format_row({"text": text}, byte_tok,
                              _cfg(seq_len=5, truncation="split"))
  targets = np.concatenate([u[0][1] for u in chunks])
  np.testing.assert_array_equal(targets, ids[1:])  # every target exactly once
  assert max(len(u[0][0]) for u in chunks) == 5


def test_right_truncation_of_completion_is_a_bad_row(byte_tok):
  cfg = _cfg(format="prompt_completion", seq_len=4, truncation="right")
  with pytest.raises(formats.RowError, match="no trained target"):
    formats.format_row({"prompt": "long prompt", "completion": "x"},
                       byte_tok, cfg)


@pytest.mark.parametrize("row,reason", [
    ('{"text": ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"txt": "a"}, "missing field 'text'"),
    ({"text": 3}, "expected a string, got int"),
    ({"text": "   "}, "empty text"),
])
def test_bad_text_rows(byte_tok, row, reason):
  with pytest.raises(formats.RowError, match=reason):
    formats.format_row(row, byte_tok, _cfg(format="text"))


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "a", "completion": ""}, "empty completion"),
    ({"prompt": "a"}, "missing field 'completion'"),
    ({"prompt": ["a"], "completion": "b"}, "expected a string, got list"),
])
def test_bad_completion_rows(byte_tok, row, reason):
  with pytest.raises(formats.RowError, match=reason):
    formats.format_row(row, byte_tok, _cfg(format="prompt_completion"))


def _toy_chat_segments(tok, messages, *, style=None,
                       add_generation_prompt=False):
  """A stand-in template: '<role>\\n' content '<end>\\n' per turn."""
  del style
  segs = []
  for m in messages:
    segs.append((tok.encode(f"<{m['role']}>\n"), "template"))
    segs.append((tok.encode(m["content"]), m["role"]))
    end_role = "assistant" if m["role"] == "assistant" else "template"
    segs.append((tok.encode("<end>\n"), end_role))
  if add_generation_prompt:
    segs.append((tok.encode("<assistant>\n"), "template"))
  return segs


CHAT = {"messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


@pytest.mark.parametrize("train_on,want", [
    (None, "hello<end>\n4<end>\n"),
    ("assistant", "hello<end>\n4<end>\n"),
    ("last", "4<end>\n"),
])
def test_chat_masks_with_toy_template(byte_tok, monkeypatch, train_on, want):
  monkeypatch.setattr(tokenizers, "chat_segments", _toy_chat_segments,
                      raising=False)
  (doc,) = _one(CHAT, byte_tok, _cfg(format="chat", train_on=train_on))
  # The first id has no target; everything else is trained in order.
  assert _trained_text(byte_tok, doc) == want


def test_chat_train_on_all_and_bad_rows(byte_tok, monkeypatch):
  monkeypatch.setattr(tokenizers, "chat_segments", _toy_chat_segments,
                      raising=False)
  (doc,) = _one(CHAT, byte_tok, _cfg(format="chat", train_on="all"))
  assert doc[2].all()
  cfg = _cfg(format="chat")
  with pytest.raises(formats.RowError, match="no assistant message"):
    formats.format_row({"messages": CHAT["messages"][:2]}, byte_tok, cfg)
  with pytest.raises(formats.RowError, match=r"\[1\]: expected"):
    formats.format_row({"messages": [{"role": "user", "content": "a"},
                                     {"role": "assistant"}]}, byte_tok, cfg)


_EOT = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>",
        "llama3": "<|eot_id|>"}


def _trained_runs(doc):
  """Maximal runs of consecutive trained targets, as id lists."""
  runs, current = [], []
  for target, m in zip(doc[1].tolist(), doc[2].tolist()):
    if m:
      current.append(target)
    elif current:
      runs.append(current)
      current = []
  return runs + ([current] if current else [])


@pytest.mark.parametrize("style", ["gemma", "chatml", "llama3"])
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_chat_masks_with_real_templates(chat_tok, style, train_on):
  cfg = _cfg(format="chat", chat_style=style, train_on=train_on)
  (doc,) = _one(CHAT, chat_tok, cfg)
  # The tokens are exactly what inference renders for the conversation.
  rendered = tokenizers.render_chat(chat_tok, CHAT["messages"], style=style,
                                    add_generation_prompt=False)
  assert doc[0].tolist() + doc[1][-1:].tolist() == rendered
  eot = chat_tok.token_id(_EOT[style])
  want = [chat_tok.encode(m["content"]) + [eot]
          for m in CHAT["messages"] if m["role"] == "assistant"]
  assert _trained_runs(doc) == (want[-1:] if train_on == "last" else want)
