"""A dependency-free UTF-8 byte tokenizer for tests and toy runs.

ids: 0 = pad, 1 = bos, 2 = eos, 3 + b for byte b (vocab_size 259).
"""
from __future__ import annotations


class ByteTokenizer:
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 259

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    ids = [b + 3 for b in text.encode("utf-8")]
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids) -> str:
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")
