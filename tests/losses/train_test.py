"""Token losses inside the real train step: reference head, rng and step."""
import jax
import numpy as np

from tunejax import data, models
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config

LORA = {"method": "lora", "rank": 4, "alpha": 8.0}


def _run(cfg, batch, steps=3, with_ref=False):
  """-> (metrics per step, reference log-softmax [B, L, V] float64 at init
  or None)."""
  model_cfg, params = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  ref_logp = _ref_logp(model_cfg, run, state, batch) if with_ref else None
  step = setup.jit_train_step(run, cfg.micro_batches)
  gb = data.to_global(batch, run.mesh, run.batch_sharding)
  out = []
  for _ in range(steps):
    state, m = step(state, gb, jax.random.PRNGKey(0))
    out.append({k: float(v) for k, v in m.items()})
  return out, ref_logp


def _ref_logp(model_cfg, run, state, batch):
  base, adapters = run.method.reference(state.params, state.frozen)
  logits = np.asarray(models.forward(
      model_cfg, base, batch["tokens"], batch["positions"],
      batch["segment_ids"], adapters=adapters, seam=run.method.seam),
                      np.float64)
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_asft_with_lora_anchors_to_frozen_base():
  cfg = tiny_config(total_steps=3, peft=LORA,
                    loss={"name": "asft", "options": {"kl_weight": 0.1}})
  batch = random_batch(0)
  m, logp = _run(cfg, batch, with_ref=True)
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


def test_masked_thought_masks_training_inputs_only():
  """With masked_thought on, the training loss differs (inputs masked) but
  eval (no optimizer step in the batch) sees the clean inputs."""
  import jax as _jax
  from tunejax import data as _data
  from tunejax.train import setup as _setup
  from tests.train.helpers import random_batch, tiny_config as _tiny
  losses_ = {}
  for rate in (0.0, 0.9):
    cfg = _tiny(data={"masked_thought": rate, "mask_token_id": 0},
                optim={"name": "sgd", "lr": 1e-9, "clip_norm": 0.0})
    model_cfg, _ = _setup.load_model(cfg.model)
    state, run = _setup.build(cfg, model_cfg, None)
    b = _data.to_global(random_batch(0), run.mesh, run.batch_sharding)
    ev = _setup.jit_eval_step(run)(state.params, state.frozen, b,
                                   state.history)
    state = state.replace(step=state.step + 10)  # a ramped-up rate
    _, m = _setup.jit_train_step(run, 1)(state, b, _jax.random.PRNGKey(0))
    losses_[rate] = (float(ev["loss_sum"] / ev["denom"]), float(m["loss"]))
  assert losses_[0.0][0] == losses_[0.9][0]        # eval unaffected
  assert abs(losses_[0.0][1] - losses_[0.0][0]) < 1e-5
  assert abs(losses_[0.9][1] - losses_[0.0][1]) > 1e-3  # inputs were masked
