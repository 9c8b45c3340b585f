"""T-REG token rewards (tunejax.train.treg) vs a direct float64 computation."""
import json

import jax
import numpy as np
import pytest

from tests.train.helpers import tiny_config
from tunejax import data, errors, models
from tunejax.losses import token_pref
from tunejax.train import metrics as metrics_lib
from tunejax.train import preference, setup, tasks, treg

BETTER, WORSE = "Good: ", "Bad answer: "  # different lengths on purpose
ROWS = [("1+2=", "3", "4"), ("10+25=", "35", "36 or so"),
        ("7*8=", "56", "54"), ("hi", "hello there", "go"),
        ("2-9=", "-7", "7"), ("abc", "def", "xyz!"),
        ("33+4=", "37", "38"), ("q", "answer", "no")]


def _write(path):
  with open(path, "w") as f:
    for p, c, r in ROWS:
      f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")


def treg_config(**kw):
  sections = dict(task="dpo", data={"format": "preference", "seq_len": 32,
                                    "batch_size": 8},
                  peft={"method": "lora", "rank": 8, "alpha": 16.0},
                  loss={"name": "treg", "options": {"beta": 0.5},
                        "treg_better_prompt": BETTER,
                        "treg_worse_prompt": WORSE},
                  checkpoint={"async_save": False},
                  eval={"every": 0, "batches": 4, "data": {"shuffle": False}},
                  log={"every": 5, "progress": False, "tensorboard": False})
  sections.update(kw)
  return tiny_config(**sections)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  path = tmp_path_factory.mktemp("treg") / "pairs.jsonl"
  _write(path)
  cfg = treg_config(data={"source": "jsonl", "path": str(path),
                          "format": "preference", "seq_len": 32,
                          "batch_size": 8, "num_epochs": 1,
                          "shuffle": False})
  model_cfg, params = setup.load_model(cfg.model)  # None: random init
  tok = setup.load_tokenizer(cfg.model)
  batch = next(data.make_iterator(cfg.data, tok, seed=0))
  scorer = treg.Scorer(cfg, model_cfg, params, tok)
  # The initial model: LoRA's B = 0, so the frozen base params are exact.
  base = scorer.state.frozen
  return cfg, model_cfg, base, tok, batch, scorer.rewards(batch)


def _direct_logps(model_cfg, params, seqs):
  """For each (ids, start): log π(ids[t+1] | ids[:t+1]), t >= start - 1,
  from full logits in float64 (one forward; right padding is causal-safe)."""
  width = max(len(ids) for ids, _ in seqs)
  tokens = np.zeros((len(seqs), width), np.int32)
  for j, (ids, _) in enumerate(seqs):
    tokens[j, :len(ids)] = ids
  logits = np.asarray(jax.jit(models.forward, static_argnums=0)(
      model_cfg, params, tokens), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  out = []
  for j, (ids, start) in enumerate(seqs):
    t = np.arange(start - 1, len(ids) - 1)
    out.append(logp[j, t, np.asarray(ids)[t + 1]])
  return out


def test_contrastive_doc_inserts_before_prompt():
  # [bos] p p | r r [eos]: targets shifted by one, response + eos trained.
  tokens = np.array([1, 10, 11, 20, 21]), np.array([10, 11, 20, 21, 2])
  mask = np.array([0, 0, 1, 1, 1], np.float32)
  tok, tgt, m, w = treg.contrastive_doc(*tokens, mask, [7, 8, 9], bos_id=1)
  np.testing.assert_array_equal(tok, [1, 7, 8, 9, 10, 11, 20, 21])
  np.testing.assert_array_equal(tgt, [7, 8, 9, 10, 11, 20, 21, 2])
  np.testing.assert_array_equal(m, [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(w, np.ones(8))
  # The same trained targets, in order.
  np.testing.assert_array_equal(tgt[m > 0], tokens[1][mask > 0])
  # No BOS: the instruction goes first.
  tok, tgt, m, _ = treg.contrastive_doc(
      np.array([10, 20]), np.array([20, 2]), np.array([1, 1], np.float32),
      [7], bos_id=1)
  np.testing.assert_array_equal(tok, [7, 10, 20])
  np.testing.assert_array_equal(tgt, [10, 20, 2])
  np.testing.assert_array_equal(m, [0, 1, 1])


def test_reward_forms_and_config_check():
  rng = np.random.default_rng(0)
  b, w = rng.normal(size=16), rng.normal(size=16)
  np.testing.assert_allclose(
      token_pref.contrastive_token_rewards(b, w, form="diff"), b - w, atol=1e-6)
  np.testing.assert_allclose(token_pref.contrastive_token_rewards(b, w),
                             1.0 / (1.0 + np.exp(w - b)) - 0.5, atol=1e-6)
  bad = treg_config(loss={"name": "treg", "treg_reward": "clip"})
  with pytest.raises(errors.ConfigError, match="treg_reward"):
    preference.check(bad)


def test_rewards_equal_direct_computation(scored):
  """Packed rows; each pair's rewards vs full-logit float64 forwards of
  [bos] instruction prompt response [eos] built from the raw strings."""
  _, model_cfg, params, tok, batch, (rew_w, rew_l) = scored
  seg = batch["chosen_segment_ids"]
  assert max(len(np.unique(s[s > 0])) for s in seg) >= 2  # packed rows
  by_ids = {}
  for p, c, r in ROWS:
    for side, resp in (("chosen", c), ("rejected", r)):
      key = tuple([tok.bos_id] + tok.encode(p) + tok.encode(resp)
                  + [tok.eos_id])
      by_ids[key] = (p, resp)
  got, seqs = [], []
  for side, rew in (("chosen", rew_w), ("rejected", rew_l)):
    for i in range(rew.shape[0]):
      s_ids = batch[f"{side}_segment_ids"][i]
      mask = batch[f"{side}_loss_mask"][i] > 0
      # Exactly the response targets carry rewards.
      assert np.all(rew[i][~mask] == 0.0)
      for k in np.unique(s_ids[s_ids > 0]):
        sel = s_ids == k
        ids = tuple(batch[f"{side}_tokens"][i][sel]) + (
            batch[f"{side}_targets"][i][sel][-1],)
        prompt, resp = by_ids[tuple(int(x) for x in ids)]
        for instr in (BETTER, WORSE):
          prefix = [tok.bos_id] + tok.encode(instr) + tok.encode(prompt)
          seqs.append((prefix + tok.encode(resp) + [tok.eos_id],
                       len(prefix)))
        got.append(rew[i][sel & mask])
  assert len(got) == 2 * len(ROWS)
  lps = _direct_logps(model_cfg, params, seqs)
  for j, g in enumerate(got):
    lp_better, lp_worse = lps[2 * j], lps[2 * j + 1]
    want = 1.0 / (1.0 + np.exp(-(lp_better - lp_worse))) - 0.5
    assert g.shape == want.shape
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-6)
  assert np.abs(rew_w).max() > 1e-3  # not trivially zero


def test_table_round_trip_and_stale_meta(scored, tmp_path):
  _, _, _, _, batch, (rew_w, rew_l) = scored
  table = preference.RefTable(field=treg.FIELD, meta="a")
  table.add(batch, rew_w, rew_l)
  got = preference.stored_table(str(tmp_path), treg.TABLE, lambda: table,
                                meta="a")
  assert got is table and (tmp_path / treg.TABLE).exists()

  def fail():
    raise AssertionError("recomputed a valid table")
  again = preference.stored_table(str(tmp_path), treg.TABLE, fail, meta="a")
  out = again.annotate(batch)
  np.testing.assert_array_equal(out["chosen_token_rewards"], rew_w)
  np.testing.assert_array_equal(out["rejected_token_rewards"], rew_l)
  # Other prompts: the stored table is stale and gets recomputed.
  fresh = preference.RefTable(field=treg.FIELD, meta="b")
  assert preference.stored_table(str(tmp_path), treg.TABLE, lambda: fresh,
                                 meta="b") is fresh


def test_treg_trains_end_to_end(tmp_path):
  cfg = treg_config(total_steps=30,
                    data={"format": "preference", "synthetic_size": 32,
                          "seq_len": 32, "batch_size": 8})
  res = tasks.run(cfg, str(tmp_path))
  assert (tmp_path / treg.TABLE).exists()
  rows = metrics_lib.read(str(tmp_path))
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  assert "reg" in train[-1] and abs(train[-1]["reg"]) > 0
  assert evals[0]["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
  assert evals[-1]["eval/rewards/margin"] > 0.25
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1
  assert train[-1]["loss"] < train[0]["loss"]
  assert res["metrics"]["rewards/accuracy"] >= 0.7
