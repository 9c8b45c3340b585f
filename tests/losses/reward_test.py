"""Bradley-Terry reward model: last-token scores, loss, training, save/load."""
import numpy as np
import pytest

import jax.numpy as jnp

from tests.losses.preference_test import LAYOUT, make_batch
from tests.train.helpers import tiny_config
from tunejax.losses import reward as rw
from tunejax.train import metrics as metrics_lib
from tunejax.train import reward, setup


def test_sequence_scores_read_last_token_of_each_segment():
  batch = make_batch()
  seg = batch["chosen_segment_ids"]
  b, l = seg.shape
  rng = np.random.default_rng(0)
  h = rng.normal(size=(b, l, 5)).astype(np.float32)
  head = {"w": jnp.asarray(rng.normal(size=5), jnp.float32),
          "b": jnp.asarray(0.3, jnp.float32)}
  got = np.asarray(rw.sequence_scores(jnp.asarray(h), jnp.asarray(seg),
                                      head))
  present = np.asarray(rw.segment_present(jnp.asarray(seg)))
  for i, row in enumerate(LAYOUT):
    for k in range(1, l + 1):
      cols = np.nonzero(seg[i] == k)[0]
      assert present[i, k] == (k <= len(row))
      if len(cols):
        want = np.float64(h[i, cols[-1]]) @ np.asarray(head["w"],
                                                        np.float64) + 0.3
        np.testing.assert_allclose(got[i, k], want, rtol=1e-5, atol=1e-6)


def test_bradley_terry_matches_formula():
  rng = np.random.default_rng(1)
  r_w, r_l = rng.normal(size=7), rng.normal(size=7)
  valid = (rng.random(7) < 0.7).astype(np.float64)
  loss, n, aux = rw.bradley_terry(jnp.asarray(r_w, jnp.float32),
                                  jnp.asarray(r_l, jnp.float32),
                                  jnp.asarray(valid, jnp.float32))
  # TRL RewardTrainer (no margin): -logsigmoid(r_chosen - r_rejected).
  want = np.sum(valid * np.logaddexp(0.0, -(r_w - r_l)))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(n) == valid.sum()
  assert float(aux["accuracy_sum"]) == np.sum(valid * (r_w > r_l))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("rm")
  cfg = tiny_config(task="reward", total_steps=30,
                    data={"format": "preference", "synthetic_size": 32,
                          "seq_len": 48, "batch_size": 8},
                    peft={"method": "none"},
                    optim={"lr": 3e-3, "warmup_steps": 0},
                    eval={"every": 0, "batches": 4,
                          "data": {"shuffle": False}},
                    log={"every": 5, "progress": False,
                         "tensorboard": False})
  model_cfg, params = setup.load_model(cfg.model)
  tok = setup.load_tokenizer(cfg.model)
  out = reward.train(cfg, str(wd), model_cfg, params, tok)
  return cfg, wd, tok, out


def test_reward_model_pairwise_accuracy_rises(trained):
  _, wd, _, out = trained
  evals = [r for r in metrics_lib.read(str(wd)) if "eval/accuracy" in r]
  # The zero-initialised head ties every pair at the start (accuracy 0).
  assert evals[0]["eval/accuracy"] == 0.0
  assert evals[-1]["eval/accuracy"] >= 0.8
  assert evals[-1]["eval/loss"] < 0.6 < evals[0]["eval/loss"]
  assert out["metrics"]["margin"] > 0.5


def test_scoring_and_reload(trained):
  cfg, _, tok, out = trained
  from tunejax.data import synthetic
  ex = synthetic.make_examples("add2", 32, cfg.data.synthetic_seed)
  prompts = [e["prompt"] for e in ex] * 2
  responses = [e["chosen"] for e in ex] + [e["rejected"] for e in ex]
  scores = reward.score_texts(out["reward_model"], tok, prompts, responses)
  assert scores.shape == (64,) and np.all(np.isfinite(scores))
  assert np.mean(scores[:32] > scores[32:]) >= 0.8
  again = reward.load(out["export"])
  np.testing.assert_allclose(
      reward.score_texts(again, tok, prompts, responses), scores,
      rtol=1e-5, atol=1e-5)
