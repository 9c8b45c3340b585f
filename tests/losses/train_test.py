"""Token losses inside the real train step: reference head, rng and step."""
import jax
import numpy as np

from tunejax import data, models
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config

LORA = {"method": "lora", "rank": 4, "alpha": 8.0}


def _run(cfg, batch, steps=3):
  """-> (metrics per step, reference log-softmax [B, L, V] float64 at init)."""
  model_cfg, params = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  base, adapters = run.method.reference(state.params, state.frozen)
  logits = np.asarray(models.forward(
      model_cfg, base, batch["tokens"], batch["positions"],
      batch["segment_ids"], adapters=adapters, seam=run.method.seam),
                      np.float64)
  logits -= logits.max(-1, keepdims=True)
  ref_logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  step = setup.jit_train_step(run, cfg.micro_batches)
  gb = data.to_global(batch, run.mesh, run.batch_sharding)
  out = []
  for _ in range(steps):
    state, m = step(state, gb, jax.random.PRNGKey(0))
    out.append({k: float(v) for k, v in m.items()})
  return out, ref_logp


def test_asft_with_lora_anchors_to_frozen_base():
  cfg = tiny_config(total_steps=3, peft=LORA,
                    loss={"name": "asft", "options": {"kl_weight": 0.1}})
  batch = random_batch(0)
  m, logp = _run(cfg, batch)
  # LoRA's B starts at zero: the policy equals the reference at step 0, so
  # the loss is the DFT term of the base model's float64 log-softmax.
  assert abs(m[0]["kl"]) < 1e-6
  gold = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  want = np.sum(mask * np.exp(gold) * -gold) / mask.sum()
  np.testing.assert_allclose(m[0]["loss"], want, rtol=1e-4)
  # Then the adapters move the policy away from the frozen base.
  assert m[1]["kl"] > 1e-6 and m[2]["kl"] > m[1]["kl"]
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in m)


def test_fait_schedule_sees_the_step_and_otr_runs():
  fait = tiny_config(total_steps=3, loss={
      "name": "fait", "options": {"schedule": "linear", "total_steps": 4}})
  m, _ = _run(fait, random_batch(1))
  np.testing.assert_allclose([r["fait_scale"] for r in m], [0, .25, .5],
                             atol=1e-6)
  otr = tiny_config(total_steps=3, micro_batches=2, loss={
      "name": "otr", "options": {"num_samples": 8, "beta": -0.1}})
  m, _ = _run(otr, random_batch(2))
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in m)
