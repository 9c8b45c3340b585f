"""`DataConfig`: the `config.data` section as a frozen dataclass."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from tunejax import errors

# Formats whose rows become one causal-LM document each.
LM_FORMATS = ("text", "prompt_completion", "chat", "prompt_answer")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the rows come from, how they become tokens and how they batch.

  Attributes:
    source: 'jsonl' (plain or .gz), 'text' (one document per non-empty line),
      'tfds' (a prepared TFDS dataset, read without TensorFlow), 'parquet',
      or 'synthetic' (`tunejax.data.synthetic`, generated in memory).
    path: file, glob, comma-separated list or directory; for 'tfds' a
      registry name (prepared under `tfds_data_dir`) or a prepared dataset
      directory.
    split: TFDS split to read.
    tfds_data_dir: TFDS data dir (None = TFDS default / $TFDS_DATA_DIR).
    format: how a row becomes tokens (see `tunejax.data.formats`).
    *_field: names of the row fields each format reads.
    weights_field: optional per-row number that scales every target weight.
    spans_field: optional list of `[start, end, weight]` character spans of
      the trained text (text / completion / answer / chosen+rejected) whose
      tokens get `weight`; adds a `weights` key to batches.
    chat_style: passed to `tunejax.tokenizers.chat_segments` (None = auto).
    train_on: chat: 'assistant' | 'last' | 'all'; prompt_completion and
      prompt_answer: 'completion' | 'all'; None = the format's default
      (assistant / completion).
    seq_len: tokens per row (model input length).
    packing: pack several documents per row (best-fit decreasing).
    pack_window: documents considered together by the packer.
    truncation: over-long documents: 'drop' (a bad row), 'left' (keep the
      end), 'right' (keep the start) or 'split' (LM formats: consecutive
      chunks, every target kept once).
    batch_size: GLOBAL rows per batch (split evenly over processes).
    shuffle / shuffle_seed: seeded shuffle, reshuffled each epoch; seed None
      = the `seed` given to `make_iterator`.
    num_epochs: None repeats forever.
    bad_rows: 'skip' (count + log the first few) or 'error' (DataError).
    add_bos / add_eos: wrap plain-text documents and prompt+completion pairs
      (chat follows its template instead).
    synthetic_task / synthetic_size / synthetic_seed: for source='synthetic'.
  """
  source: Literal["jsonl", "text", "tfds", "parquet", "synthetic"] = "jsonl"
  path: str = ""
  split: str = "train"
  tfds_data_dir: Optional[str] = None
  format: Literal["text", "prompt_completion", "chat", "preference",
                  "prompt_answer"] = "text"
  text_field: str = "text"
  prompt_field: str = "prompt"
  completion_field: str = "completion"
  messages_field: str = "messages"
  chosen_field: str = "chosen"
  rejected_field: str = "rejected"
  answer_field: str = "answer"
  weights_field: Optional[str] = None
  spans_field: Optional[str] = None
  chat_style: Optional[str] = None
  train_on: Optional[Literal["assistant", "last", "all", "completion"]] = None
  seq_len: int = 512
  packing: bool = True
  pack_window: int = 256
  truncation: Literal["drop", "left", "right", "split"] = "drop"
  batch_size: int = 8
  shuffle: bool = True
  shuffle_seed: Optional[int] = None
  num_epochs: Optional[int] = None
  bad_rows: Literal["skip", "error"] = "skip"
  add_bos: bool = True
  add_eos: bool = True
  synthetic_task: str = "add2"
  synthetic_size: int = 1000
  synthetic_seed: int = 0
  # Masked Thought (step-time input transform): max fraction of response
  # input tokens replaced by `mask_token_id` (None = pad id); 0 = off.
  masked_thought: float = 0.0
  mask_token_id: Optional[int] = None

  def validate(self) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    def bad(key, why):
      raise errors.ConfigError(f"config.data.{key}: {why}")
    if self.seq_len < 2:
      bad("seq_len", f"must be >= 2, got {self.seq_len}")
    if self.batch_size < 1:
      bad("batch_size", f"must be >= 1, got {self.batch_size}")
    if self.pack_window < 1:
      bad("pack_window", f"must be >= 1, got {self.pack_window}")
    if self.num_epochs is not None and self.num_epochs < 1:
      bad("num_epochs", f"must be None or >= 1, got {self.num_epochs}")
    if self.source != "synthetic" and not self.path:
      bad("path", f"required for source={self.source!r}")
    if self.source == "synthetic":
      from tunejax.data import synthetic  # pylint: disable=g-import-not-at-top
      if self.synthetic_task not in synthetic.TASKS:
        bad("synthetic_task", f"expected one of {sorted(synthetic.TASKS)}, "
            f"got {self.synthetic_task!r}")
      if self.synthetic_size < 1:
        bad("synthetic_size", f"must be >= 1, got {self.synthetic_size}")
    allowed = {"chat": (None, "assistant", "last", "all"),
               "prompt_completion": (None, "completion", "all"),
               "prompt_answer": (None, "completion", "all")}
    if self.train_on not in allowed.get(self.format, (None,)):
      bad("train_on", f"{self.train_on!r} is not valid for format="
          f"{self.format!r} (allowed: {allowed.get(self.format, (None,))})")
    if self.format == "preference" and self.truncation == "split":
      bad("truncation", "'split' cannot keep chosen/rejected pairs aligned; "
          "use 'drop', 'left' or 'right'")
