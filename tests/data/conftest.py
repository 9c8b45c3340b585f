"""Tiny tokenizers for the data tests (no files, no network)."""
import io

import pytest
import sentencepiece as spm


class ByteTokenizer:
  """ids = UTF-8 bytes + 3; 0 pad, 1 bos, 2 eos. Exact and invertible."""
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text, *, add_bos=False):
    return ([self.bos_id] if add_bos else []) + [b + 3 for b in
                                                 text.encode("utf-8")]

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids if i >= 3).decode("utf-8")


class SpTokenizer:
  """The tokenizer protocol over an in-memory trained sentencepiece model."""

  def __init__(self, proto: bytes):
    self.sp = spm.SentencePieceProcessor(model_proto=proto)
    self.pad_id, self.bos_id, self.eos_id = (self.sp.pad_id(),
                                             self.sp.bos_id(),
                                             self.sp.eos_id())

  def encode(self, text, *, add_bos=False):
    return ([self.bos_id] if add_bos else []) + self.sp.encode(text)

  def decode(self, ids):
    return self.sp.decode([int(i) for i in ids])


@pytest.fixture(scope="session")
def byte_tok():
  return ByteTokenizer()


@pytest.fixture(scope="session")
def sp_tok():
  words = ["the cat sat on the mat", "12+34=46", "reverse the word",
           "hello world", "a quick brown fox jumps over the lazy dog"]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(words * 20), model_writer=buf, vocab_size=60,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
      hard_vocab_limit=False)
  return SpTokenizer(buf.getvalue())


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory):
  """A real `tunejax.tokenizers.Tokenizer` with every style's chat tokens."""
  from tunejax import tokenizers  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["be brief hi hello 2+2? 4 user model"] * 50),
      model_writer=buf, vocab_size=60, pad_id=0, unk_id=1, bos_id=2,
      eos_id=3, minloglevel=2, hard_vocab_limit=False,
      control_symbols=["<start_of_turn>", "<end_of_turn>", "<|im_start|>",
                       "<|im_end|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>"])
  path = tmp_path_factory.mktemp("tok") / "chat.model"
  path.write_bytes(buf.getvalue())
  return tokenizers.from_sentencepiece_file(str(path))
