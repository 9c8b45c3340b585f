"""Shared fixtures: one tiny random HF model per family, saved once."""
import numpy as np
import pytest


VOCAB = 128
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               initializer_range=0.1, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)


def _hf_configs():
  import transformers as tr  # pylint: disable=import-outside-toplevel
  return {
      # llama3 rope scaling with a short original context so positions
      # 0..40 see all three frequency regimes.
      "llama": tr.LlamaConfig(
          num_hidden_layers=2, tie_word_embeddings=False,
          rope_parameters=dict(rope_type="llama3", rope_theta=10000.0,
                               factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0,
                               original_max_position_embeddings=16),
          **_COMMON),
      "qwen2": tr.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True,
                              **_COMMON),
      "qwen3": tr.Qwen3Config(num_hidden_layers=2, tie_word_embeddings=False,
                              **_COMMON),
      # Softcaps small enough to bite; window 8 < the 32-token sequences.
      "gemma2": tr.Gemma2Config(
          num_hidden_layers=2, sliding_window=8, attn_logit_softcapping=2.0,
          final_logit_softcapping=3.0, query_pre_attn_scalar=24, **_COMMON),
      # 6 layers = the 5 local : 1 global pattern once.
      "gemma3": tr.Gemma3TextConfig(
          num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=24,
          **_COMMON),
  }


def _build(family, hf_cfg, path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(FAMILIES.index(family))
  # Eager attention: HF's sdpa path silently drops Gemma 2's attention
  # softcap (measured 0.58 max logit error), eager is the reference.
  model = transformers.AutoModelForCausalLM.from_config(
      hf_cfg, attn_implementation="eager").eval()
  with torch.no_grad():  # Non-trivial norms and biases (HF inits 1/0).
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.rand_like(p) * 0.5 - 0.25)
      if "bias" in name:
        p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
  """{family: (torch model, saved dir)}."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = {}
  for family, cfg in _hf_configs().items():
    path = str(tmp_path_factory.mktemp("hf") / family)
    out[family] = (_build(family, cfg, path), path)
  return out


@pytest.fixture(scope="session")
def loaded(hf_models):
  """{family: (ModelConfig, params)} loaded by tunejax."""
  from tunejax import models
  return {f: models.load(path) for f, (_, path) in hf_models.items()}


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    kw = {}
    if attention_mask is not None:
      kw["attention_mask"] = torch.tensor(np.asarray(attention_mask))
    if position_ids is not None:
      kw["position_ids"] = torch.tensor(np.asarray(position_ids))
    return model(torch.tensor(np.asarray(tokens)), **kw).logits.numpy()
