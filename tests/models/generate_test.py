"""Sampling paths of `generate` (greedy parity with HF is in hf_test.py).

Reference: teacher-forced `forward` over prompt + generated tokens, which
must reproduce the KV-cache decode's log-probs and respect top-k.
"""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import errors, models
from tunejax.models import layers

CFG = models.preset("tiny-gemma3")  # Sliding window 8, local + global.
PROMPTS = [[5, 9, 11], list(range(20, 32)), [7, 7, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def params():
  p = models.init(CFG, jax.random.key(0))
  # Larger weights give peaked, tie-free distributions.
  return jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, p)


@pytest.fixture(scope="module")
def greedy(params):
  return models.generate(CFG, params, PROMPTS, 16, eos_id=-1)


_FWD = jax.jit(models.forward, static_argnums=0)


def _teacher_forced(params, new_BxT, prompts=PROMPTS):
  """Per row: log-softmax rows [T, V] predicting each new token, and the
  new tokens' log-probs, from one right-padded, jitted forward pass."""
  t = new_BxT.shape[1]
  width = max(map(len, prompts)) + t
  seqs = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    seqs[i, :len(p) + t] = p + list(new_BxT[i])
  logp = np.asarray(jax.nn.log_softmax(_FWD(CFG, params, seqs), axis=-1))
  out = []
  for i, p in enumerate(prompts):
    rows = logp[i, len(p) - 1:len(p) - 1 + t]
    out.append((rows, rows[np.arange(t), new_BxT[i]]))
  return out


def test_greedy_equals_teacher_forced_argmax(params, greedy):
  tf = _teacher_forced(params, np.asarray(greedy.tokens_BxT))
  for i in range(len(PROMPTS)):
    new = list(np.asarray(greedy.tokens_BxT[i]))
    rows, lp = tf[i]
    np.testing.assert_array_equal(rows.argmax(-1), new)
    np.testing.assert_allclose(greedy.logps_BxT[i], lp, atol=1e-4)
  assert list(greedy.lengths_B) == [16, 16, 16]


def test_top_k_1_with_tiny_top_p_is_greedy(params, greedy):
  out = models.generate(CFG, params, PROMPTS, 16, temperature=0.7, top_k=1,
                        top_p=1e-6, rng=jax.random.key(3), eos_id=-1)
  np.testing.assert_array_equal(out.tokens_BxT, greedy.tokens_BxT)


def test_top_k_sampling_logps_and_support(params):
  out = models.generate(CFG, params, PROMPTS, 16, temperature=1.5, top_k=4,
                        rng=jax.random.key(1), eos_id=-1)
  again = models.generate(CFG, params, PROMPTS, 16, temperature=1.5,
                          top_k=4, rng=jax.random.key(1), eos_id=-1)
  np.testing.assert_array_equal(out.tokens_BxT, again.tokens_BxT)
  tf = _teacher_forced(params, np.asarray(out.tokens_BxT))
  for i in range(len(PROMPTS)):
    new = list(np.asarray(out.tokens_BxT[i]))
    rows, lp = tf[i]
    rank = (rows > rows[np.arange(len(new)), new][:, None]).sum(-1)
    assert rank.max() < 4
    # Log-probs are under the raw logits, not the tempered distribution.
    np.testing.assert_allclose(out.logps_BxT[i], lp, atol=1e-4)
  assert not np.array_equal(out.tokens_BxT, models.generate(
      CFG, params, PROMPTS, 16, temperature=1.5, top_k=4,
      rng=jax.random.key(2), eos_id=-1).tokens_BxT)


def test_per_row_eos_stop_and_padded_array_input(params, greedy):
  eos = int(greedy.tokens_BxT[1, 3])  # Row 1 stops at step 3 (or earlier).
  out = models.generate(CFG, params, PROMPTS, 16, eos_id=[eos, -5])
  tok = np.asarray(out.tokens_BxT)
  for i in range(3):
    ref = list(np.asarray(greedy.tokens_BxT[i]))
    n = ref.index(eos) + 1 if eos in ref else 16
    assert out.lengths_B[i] == n
    np.testing.assert_array_equal(tok[i, :n], ref[:n])
    assert (tok[i, n:] == CFG.pad_id).all()
    assert (np.asarray(out.logps_BxT)[i, n:] == 0).all()
  assert out.lengths_B[1] <= 4
  arr = np.zeros((3, 12), np.int32)
  for i, p in enumerate(PROMPTS):
    arr[i, :len(p)] = p
  from_array = models.generate(CFG, params, arr, 16, eos_id=-1,
                               lengths=[len(p) for p in PROMPTS])
  np.testing.assert_array_equal(from_array.tokens_BxT, greedy.tokens_BxT)


def test_unscanned_remat_config_generates_the_same(params, greedy):
  cfg = CFG.replace(scan_layers=False, remat="full")
  out = models.generate(cfg, params, PROMPTS, 16, eos_id=-1)
  np.testing.assert_array_equal(out.tokens_BxT, greedy.tokens_BxT)
  np.testing.assert_allclose(out.logps_BxT, greedy.logps_BxT, atol=1e-5)


def test_local_layers_read_only_their_window(params, monkeypatch):
  """Decode attends a local layer over its last `window` cache slots only
  (8 of 32 here), with the tokens and log-probs of reading every slot."""
  cut = []
  real = layers.cache_window

  def spy(k, v, mask, slot, l, window):
    out = real(k, v, mask, slot, l, window)
    cut.append((window, k.shape[2], out[0].shape[2], out[2].shape[2]))
    return out

  monkeypatch.setattr(layers, "cache_window", spy)
  windowed = models.generate(CFG, params, PROMPTS, 15, eos_id=-1)
  assert (8, 31, 8, 8) in cut and (None, 31, 31, 31) in cut
  monkeypatch.setattr(layers, "cache_window", lambda k, v, m, *_: (k, v, m))
  whole = models.generate(CFG, params, PROMPTS, 14, eos_id=-1)
  np.testing.assert_array_equal(windowed.tokens_BxT[:, :14], whole.tokens_BxT)
  np.testing.assert_allclose(windowed.logps_BxT[:, :14], whole.logps_BxT,
                             atol=1e-6)


def _loop_cache_copies(cfg, b, max_new):
  """Copies of KV-cache buffers inside generate's decode loop (compiled
  HLO): each is a whole buffer rewritten every step."""
  gen = importlib.import_module("tunejax.models.generate")
  p = models.init(cfg, jax.random.key(0))
  toks = jnp.ones((b, 8), jnp.int32)
  hlo = gen._generate.lower(  # pylint: disable=protected-access
      cfg, models.Seam(), max_new, 0.0, None, None, (-1,), 1, p, {}, toks,
      jnp.full((b,), 8, jnp.int32), jax.random.key(0)).compile().as_text()
  buf = re.compile(rf"f32\[[0-9,]*{8 + max_new},{cfg.head_dim}\]\S* copy\(")
  n, body = 0, False
  for line in hlo.splitlines():
    if line.rstrip().endswith("{") and not line.startswith(" "):
      body = not line.startswith("ENTRY")
    n += bool(body and buf.search(line))
  return n


@pytest.mark.parametrize("b,window,kv_heads", [
    (3, 8, 1),    # local layers cut their window (tiny-gemma3: 1 KV head)
    (1, 8, 1),
    (3, 64, 1),   # window longer than the cache: whole buffers
    (1, 64, 2)])
def test_decode_updates_the_cache_in_place(b, window, kv_heads):
  """A size-1 batch or KV-head dim made XLA fuse each layer's cache update
  into two consumers, out of place: 4 whole-buffer copies per layer and
  step (a Gemma 3-shaped step at slot 2048: 42 ms, 14 ms in place)."""
  cfg = CFG.replace(sliding_window=window, n_kv_heads=kv_heads)
  assert _loop_cache_copies(cfg, b, 24) == 0


def test_num_samples_groups_share_one_prefill(params, greedy):
  """G samples per prompt (GRPO groups): greedy rows repeat the single
  sample; sampled rows differ within a group and their log-probs are the
  teacher-forced ones of their own prompt."""
  g = 3
  out = models.generate(CFG, params, PROMPTS, 16, eos_id=-1, num_samples=g)
  np.testing.assert_array_equal(
      out.tokens_BxT, np.repeat(np.asarray(greedy.tokens_BxT), g, axis=0))
  np.testing.assert_allclose(
      out.logps_BxT, np.repeat(np.asarray(greedy.logps_BxT), g, axis=0),
      atol=1e-5)
  out = models.generate(CFG, params, PROMPTS, 16, temperature=1.5,
                        rng=jax.random.key(4), eos_id=-1, num_samples=g)
  tok = np.asarray(out.tokens_BxT)
  assert tok.shape == (len(PROMPTS) * g, 16)
  prompts = [p for p in PROMPTS for _ in range(g)]
  for i, (_, lp) in enumerate(_teacher_forced(params, tok, prompts)):
    np.testing.assert_allclose(out.logps_BxT[i], lp, atol=1e-4)
  for i in range(len(PROMPTS)):
    group = {tuple(r) for r in tok[i * g:(i + 1) * g]}
    assert len(group) > 1, group
  with pytest.raises(errors.TunejaxError, match="num_samples=0"):
    models.generate(CFG, params, PROMPTS, 4, num_samples=0)


def test_s2_attention_is_training_only(params, greedy):
  # LongLoRA's shifted sparse attention approximates full attention while
  # training; generation with such a config attends in full.
  out = models.generate(CFG.replace(s2_group=4), params, PROMPTS, 16,
                        eos_id=-1)
  np.testing.assert_array_equal(out.tokens_BxT, greedy.tokens_BxT)
  np.testing.assert_allclose(out.logps_BxT, greedy.logps_BxT, atol=1e-5)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_sorted_prefix(top_p):
  """The bisection's kept set == the smallest sorted prefix whose mass
  reaches top_p (numpy float64), incl. -inf (top-k masked) logits."""
  from tunejax.models.generate import _top_p  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(int(top_p * 1000))
  logits = rs.randn(5, 700).astype(np.float32) * 3
  logits[0, 100:] = -np.inf
  logits[1, :] = logits[1, 0]  # all tied: every token is kept
  kept = np.isfinite(np.asarray(_top_p(jax.numpy.asarray(logits), top_p)))
  for row, got in zip(logits.astype(np.float64), kept):
    p = np.exp(row - row.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
    want = p >= p[order[min(n, len(p)) - 1]]
    np.testing.assert_array_equal(got, want)


def test_argmax_and_gumbel_sampler_equal_jax_reference():
  """`_argmax` == jnp.argmax (first index on ties, all -inf rows), and
  sampling == jax.random.categorical draw for draw (same Gumbel noise)."""
  from tunejax.models.generate import _argmax, _sample  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  logits = rs.randint(-3, 3, (6, 500)).astype(np.float32)  # many ties
  logits[1, :] = -np.inf
  logits[2, 7] = logits[2, 400] = 10.0
  logits = jax.numpy.asarray(logits)
  np.testing.assert_array_equal(_argmax(logits),
                                jax.numpy.argmax(logits, axis=-1))
  for seed in range(5):
    key = jax.random.key(seed)
    want = jax.random.categorical(key, logits[2:] / 0.7, axis=-1)
    got = _sample(logits[2:], key, 0.7, None, None)
    np.testing.assert_array_equal(got, want)


def test_pre_split_params_skip_the_per_call_weight_copy(params, greedy):
  """RL rollouts reuse one `split_layers(base)`: same tokens and log-probs,
  and the compiled call holds no second copy of the layer weights."""
  split = models.split_layers(params)
  assert models.split_layers(split) is split
  out = models.generate(CFG, split, PROMPTS, 16, eos_id=-1)
  np.testing.assert_array_equal(out.tokens_BxT, greedy.tokens_BxT)
  np.testing.assert_array_equal(out.logps_BxT, greedy.logps_BxT)
  gen = importlib.import_module("tunejax.models.generate")
  toks = jnp.ones((3, 8), jnp.int32)
  temp = lambda p: gen._generate.lower(  # pylint: disable=protected-access
      CFG, models.Seam(), 8, 0.0, None, None, (-1,), 1, p, {}, toks,
      jnp.full((3,), 8, jnp.int32), jax.random.key(0)).compile(
      ).memory_analysis().temp_size_in_bytes
  matrix_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"])
                     if x.ndim > 2)  # (norm-scale slices may stay views)
  assert temp(params) - temp(split) >= matrix_bytes
