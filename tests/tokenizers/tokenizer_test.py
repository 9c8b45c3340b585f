"""tunejax.tokenizers.load against sentencepiece, HF tokenizers/transformers
and a GGUF vocabulary written the way llama.cpp's converter writes it."""
import os
import pickle

import gguf
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from tunejax import errors
from tests.tokenizers.conftest import CORPUS, HF_SPECIALS, SPM_CONTROL
from tunejax import tokenizers

TEXTS = [
    "The quick brown fox.",
    "  two leading spaces and   three inside",
    "tabs\there\t\tand\nnew\n\nlines",
    "def f(x):\n    return x ** 2",
    "digits 1234567890 and 3.14",
    "Café naïve résumé",
    "unseen: 日本語 and emoji 🙂 and <b>bold</b>",
    "<start_of_turn> is plain text here",
    "",
]


@pytest.fixture(scope="module")
def sp(spm_model_bytes):
  return spm.SentencePieceProcessor(model_proto=spm_model_bytes)


@pytest.fixture(scope="module")
def spm_tok(spm_path):
  return tokenizers.load(spm_path)


@pytest.fixture(scope="module")
def hf_ref(hf_dir):
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))


def test_spm_encode_decode_match_sentencepiece(sp, spm_tok):
  for text in TEXTS:
    assert spm_tok.encode(text) == sp.encode(text), text
    assert spm_tok.decode(spm_tok.encode(text)) == text
  assert spm_tok.encode("hi", add_bos=True) == [2] + sp.encode("hi")


def test_spm_special_ids(sp, spm_tok):
  assert (spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id) == (2, 1, 0)
  assert spm_tok.vocab_size == sp.get_piece_size()
  sot, eot = (sp.piece_to_id(s) for s in SPM_CONTROL)
  assert spm_tok.token_id("<start_of_turn>") == sot
  ids = spm_tok.encode_with_special("<start_of_turn>user\nHi<end_of_turn>\n")
  assert ids == [sot] + sp.encode("user\nHi") + [eot] + sp.encode("\n")
  # Plain encode never yields control ids from text.
  assert sot not in spm_tok.encode("<start_of_turn>user")
  assert spm_tok.decode(ids) == "<start_of_turn>user\nHi<end_of_turn>\n"
  assert spm_tok.decode(ids, skip_special=True) == "user\nHi\n"


def test_hf_encode_matches_transformers(hf_dir, hf_ref):
  tok = tokenizers.load(hf_dir)
  for text in TEXTS:
    assert tok.encode(text) == hf_ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
  text = "<|im_start|>user\nHi <|im_end|>\n<|endoftext|>"
  # transformers parses special tokens in text: encode_with_special must too.
  assert tok.encode_with_special(text) == hf_ref.encode(
      text, add_special_tokens=False)
  assert hf_ref.convert_tokens_to_ids("<|im_start|>") not in tok.encode(text)


def test_hf_ids_from_config_and_guessed(hf_dir, hf_plain_json, hf_ref):
  tok = tokenizers.load(os.path.join(hf_dir, "tokenizer.json"))
  ids = hf_ref.convert_tokens_to_ids
  assert tok.bos_id is None and not tok.add_bos
  assert tok.eos_id == ids("<|im_end|>")
  assert tok.pad_id == ids("<|endoftext|>")
  assert tok.chat_template is not None
  plain = tokenizers.load(hf_plain_json)  # No config: well-known names.
  assert plain.bos_id == ids("<|begin_of_text|>")
  assert plain.eos_id == ids("<|endoftext|>")
  assert plain.pad_id == plain.eos_id  # No pad token: falls back to EOS.
  assert plain.chat_template is None
  with pytest.raises(errors.ModelError, match="no BOS"):
    tok.encode("x", add_bos=True)


def test_pickle_round_trip(spm_tok, hf_dir):
  for tok in (spm_tok, tokenizers.load(hf_dir)):
    again = pickle.loads(pickle.dumps(tok))
    text = "<|im_start|><start_of_turn>" + TEXTS[3]
    assert again.encode_with_special(text) == tok.encode_with_special(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template)


def _write_llamacpp_style_gguf(path, model_bytes, tokenizer_model="llama"):
  """Vocabulary as llama.cpp's converter writes it: <unk> typed CONTROL and
  spaces instead of U+2581 in USER_DEFINED pieces."""
  proto = spm_pb2.ModelProto.FromString(model_bytes)
  tokens, scores, types = [], [], []
  for p in proto.pieces:
    piece, ttype = p.piece, p.type
    if ttype == p.UNKNOWN:
      ttype = p.CONTROL
    elif ttype == p.USER_DEFINED:
      piece = piece.replace("\u2581", " ")
    tokens.append(piece)
    scores.append(p.score)
    types.append(int(ttype))
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tokenizer_model(tokenizer_model)
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_bos_token(True)
  w.add_add_space_prefix(False)
  w.add_chat_template("{{ messages[0]['content'] }}")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_vocabulary_with_both_fixes(sp, spm_model_bytes, tmp_path,
                                        monkeypatch):
  monkeypatch.setenv("TUNEJAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "vocab.gguf"
  _write_llamacpp_style_gguf(path, spm_model_bytes)
  tok = tokenizers.load(str(path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.chat_template == "{{ messages[0]['content'] }}"
  for text in TEXTS:
    assert tok.encode(text) == sp.encode(text), text
  assert tok.encode("a   b") == sp.encode("a   b")  # Fix 2 (user-defined).
  rebuilt = spm.SentencePieceProcessor(
      model_proto=open(next((tmp_path / "cache").glob("*.bin")),
                       "rb").read())
  assert rebuilt.unk_id() == 3  # Fix 1.
  assert len(list((tmp_path / "cache").iterdir())) == 2
  again = tokenizers.load(str(path))  # From the cache.
  assert again.encode(TEXTS[1]) == sp.encode(TEXTS[1])
  unpickled = pickle.loads(pickle.dumps(again))
  assert unpickled.encode(TEXTS[2]) == sp.encode(TEXTS[2])


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")


def _bpe_tokenizer_json(hf_dir, pre):
  """The conftest BPE (GPT-2 split), or one retrained with Llama 3's split."""
  if pre == "gpt-2":
    return open(os.path.join(hf_dir, "tokenizer.json")).read()
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import trainers
  tok = Tokenizer(models.BPE(ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=500, special_tokens=HF_SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_tokens(["<custom>"])  # A non-special added token (USER_DEFINED).
  return tok.to_str()


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_gguf_byte_level_bpe(hf_dir, pre, tmp_path, monkeypatch):
  """A 'gpt2' GGUF vocabulary (Llama 3 / Qwen style) equals its source."""
  import json
  from tokenizers import Tokenizer
  monkeypatch.setenv("TUNEJAX_CACHE", str(tmp_path / "cache"))
  source = _bpe_tokenizer_json(hf_dir, pre)
  ref = Tokenizer.from_str(source)
  spec = json.loads(source)
  vocab = {i: t for t, i in spec["model"]["vocab"].items()}
  added = {t["id"]: t for t in spec["added_tokens"]}
  vocab.update({i: t["content"] for i, t in added.items()})
  tokens = [vocab[i] for i in range(len(vocab))]
  types = [(3 if added[i]["special"] else 4) if i in added else 1
           for i in range(len(tokens))]
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in spec["model"]["merges"]]
  w = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), arch="llama")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
  w.add_eos_token_id(tokens.index("<|eot_id|>"))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  tok = tokenizers.load(str(tmp_path / "bpe.gguf"))
  assert tok.bos_id == ref.token_to_id("<|begin_of_text|>")
  assert tok.eos_id == ref.token_to_id("<|eot_id|>")
  for text in TEXTS + ["<custom> added", "<|eot_id|>x <|im_start|>"]:
    want = ref.encode(text, add_special_tokens=False).ids
    assert tok.encode_with_special(text) == want, text
    assert tok.decode(tok.encode(text)) == text
  again = pickle.loads(pickle.dumps(tok))  # Rebuilt from the cache.
  assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3])


def test_errors(spm_model_bytes, tmp_path):
  with pytest.raises(errors.ModelError, match="no such"):
    tokenizers.load(str(tmp_path / "missing.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\xff\x00garbage")
  with pytest.raises(errors.ModelError, match="bad.model"):
    tokenizers.load(str(bad))
  with pytest.raises(errors.ModelError, match="no tokenizer.json"):
    tokenizers.load(str(tmp_path))
  gpt2 = tmp_path / "gpt2.gguf"
  _write_llamacpp_style_gguf(gpt2, spm_model_bytes, tokenizer_model="gpt2")
  with pytest.raises(errors.ModelError, match="missing metadata "
                     "tokenizer.ggml.merges"):
    tokenizers.load(str(gpt2))
  truncated = tmp_path / "trunc.gguf"
  _write_llamacpp_style_gguf(truncated, spm_model_bytes)
  truncated.write_bytes(truncated.read_bytes()[:500])
  with pytest.raises(errors.ModelError, match="trunc.gguf: truncated"):
    tokenizers.load(str(truncated))
