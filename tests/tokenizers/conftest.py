"""Tiny tokenizers built in memory: a sentencepiece BPE and an HF byte-level
BPE, both with chat control tokens. Session-scoped: training takes ~1 s."""
import io
import json
import os

import pytest
import sentencepiece as spm

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there! How can I help you today?",
    "def f(x):\n    return x ** 2  # square",
    "Numbers like 12345 and 3.14159 appear in text.",
    "Café, naïve, résumé: accents are common in French.",
    "Machine learning models predict the next token.",
    "  Leading spaces,\ttabs\tand\nnewlines matter.",
    "You are a helpful assistant. Answer briefly.",
] * 20

# Gemma-like ids: pad 0, eos 1, bos 2, unk 3.
SPM_CONTROL = ["<start_of_turn>", "<end_of_turn>"]
SPM_USER = ["\u2581\u2581", "\u2581\u2581\u2581", "<b>"]

HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
               "<|begin_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def spm_model_bytes():
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe",
      vocab_size=400, hard_vocab_limit=False, byte_fallback=True,
      split_digits=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, control_symbols=SPM_CONTROL, user_defined_symbols=SPM_USER,
      character_coverage=1.0, minloglevel=2)
  return buf.getvalue()


@pytest.fixture(scope="session")
def spm_path(spm_model_bytes, tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
  path.write_bytes(spm_model_bytes)
  return str(path)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
  """tokenizer.json (byte-level BPE) + tokenizer_config.json with ChatML."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=500, special_tokens=HF_SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  directory = tmp_path_factory.mktemp("hf")
  tok.save(str(directory / "tokenizer.json"))
  config = {"bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "add_bos_token": False,
            "chat_template": CHATML_TEMPLATE}
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return str(directory)


@pytest.fixture(scope="session")
def hf_plain_json(hf_dir, tmp_path_factory):
  """The same tokenizer.json alone (no tokenizer_config.json)."""
  directory = tmp_path_factory.mktemp("hf_plain")
  path = directory / "tokenizer.json"
  path.write_bytes(open(os.path.join(hf_dir, "tokenizer.json"), "rb").read())
  return str(path)
