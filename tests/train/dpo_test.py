"""task=dpo end to end on a tiny model; precomputed == online reference."""
import numpy as np
import pytest

from tests.train.helpers import tiny_config
from tunejax import data
from tunejax.train import metrics as metrics_lib
from tunejax.train import preference, setup, tasks

PREF_DATA = {"format": "preference", "synthetic_size": 32, "seq_len": 32,
             "batch_size": 8}


def dpo_config(**kw):
  sections = dict(task="dpo", total_steps=30, data=PREF_DATA,
                  peft={"method": "lora", "rank": 8, "alpha": 16.0},
                  loss={"name": "dpo", "options": {"beta": 0.5}},
                  optim={"lr": 1e-2, "warmup_steps": 0},
                  checkpoint={"async_save": False},
                  eval={"every": 0, "batches": 4,
                        "data": {"shuffle": False}},
                  log={"every": 5, "progress": False, "tensorboard": False})
  sections.update(kw)
  return tiny_config(**sections)


def test_dpo_accuracy_and_margin_rise(tmp_path):
  cfg = dpo_config(loss={"name": "dpo",
                         "options": {"beta": 0.5, "kl_metric": True}})
  res = tasks.run(cfg, str(tmp_path))
  rows = metrics_lib.read(str(tmp_path))
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margin",
              "rewards/accuracy", "logps/chosen", "logps/rejected", "kl"):
    assert key in train[-1], key
  # LoRA B = 0 at init: policy == reference, so every reward and the
  # (exact, full-vocabulary) KL are 0; the KL then grows.
  assert evals[0]["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
  assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)
  assert 0 < train[-1]["kl"] < 100 and evals[-1]["eval/kl"] > 1e-3
  assert evals[-1]["eval/rewards/margin"] > 0.25
  assert evals[-1]["eval/rewards/accuracy"] >= 0.75
  assert train[-1]["rewards/margin"] > train[0]["rewards/margin"]
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1
  assert res["metrics"]["rewards/accuracy"] >= 0.7


def test_precomputed_reference_equals_online(tmp_path):
  online = dpo_config(total_steps=2)
  pre = dpo_config(total_steps=2, loss={"name": "dpo", "reference":
                                        "precomputed",
                                        "options": {"beta": 0.1}})
  model_cfg, params = setup.load_model(online.model)
  tok = setup.load_tokenizer(online.model)
  table = preference.precompute(pre, model_cfg, params, tok)
  state, run_on = setup.build(online, model_cfg, params)
  _, run_pre = setup.build(pre, model_cfg, params)
  assert run_on.apply_fn is not run_pre.apply_fn
  it = data.make_iterator(online.data, tok, seed=7)
  for _ in range(2):
    batch = next(it)
    out = {}
    for name, run, b in (("online", run_on, batch),
                         ("pre", run_pre, table.annotate(batch))):
      g = data.to_global(b, run.mesh, run.batch_sharding)
      out[name] = setup.jit_eval_step(run)(state.params, state.frozen, g,
                                           state.history)
    for k in ("loss_sum", "denom", "rewards/margin_sum"):
      np.testing.assert_allclose(float(out["pre"][k]),
                                 float(out["online"][k]), rtol=1e-6,
                                 atol=1e-6)
  # Round trip through the stored file.
  table.save(str(tmp_path / "t.npz"))
  again = preference.RefTable.load(str(tmp_path / "t.npz"))
  a, b = table.annotate(batch), again.annotate(batch)
  np.testing.assert_array_equal(a["chosen_ref_logp"], b["chosen_ref_logp"])


def test_full_finetune_dpo_with_precomputed_reference(tmp_path):
  """No reference copy exists for full FT: the precomputed pass serves."""
  cfg = dpo_config(total_steps=4, peft={"method": "none"},
                   loss={"name": "dpo", "reference": "precomputed",
                         "options": {"beta": 0.1, "loss_type": "ipo"}},
                   optim={"lr": 1e-3, "warmup_steps": 0},
                   eval={"every": -1})
  res = tasks.run(cfg, str(tmp_path))
  assert (tmp_path / "ref_logps.npz").exists()
  assert np.isfinite(res["metrics"]["loss"])
  assert 0.0 <= res["metrics"]["rewards/accuracy"] <= 1.0
