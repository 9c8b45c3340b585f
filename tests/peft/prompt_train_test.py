"""Prompt-family methods train through the real step / loop: the loss falls
and only the method's tensors change."""
import jax
import numpy as np
import pytest

from tunejax import data
from tunejax.peft import prompt
from tunejax.train import metrics as metrics_lib, setup, tasks
from tests.train.helpers import random_batch, tiny_config


def test_soft_prompt_from_text_trains_in_loop(tmp_path):
  """task=sft end to end: `prompt_init_text` is tokenized by the run's
  tokenizer, the loss falls over 8 steps."""
  cfg = tiny_config(total_steps=8,
                    peft={"method": "prompt", "n_virtual": 4,
                          "prompt_init": "text",
                          "prompt_init_text": "add:"},
                    optim={"lr": 0.3, "schedule": "constant"},
                    eval={"every": -1})
  res = tasks.run(cfg, str(tmp_path))
  rows = [r for r in metrics_lib.read(str(tmp_path)) if "loss" in r]
  losses = [r["loss"] for r in rows]
  # A random tiny model: the prompt buys ~0.25 nats, then plateaus.
  assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
  # The byte tokenizer maps "add:" to its 4 byte ids (+ offset), repeated.
  ids = prompt.text_ids(cfg.peft, setup.load_tokenizer(cfg.model))
  assert len(ids.prompt_init_ids) == 4
  assert set(jax.tree.leaves(jax.tree.map(np.shape, res["state"].params))) \
      == {4, 64}


@pytest.mark.parametrize("peft_cfg,optim", [
    ({"method": "prefix", "n_virtual": 4}, {"lr": 3e-2}),
    ({"method": "dept", "n_virtual": 4, "dept_max_len": 16},
     {"lr": 3e-2, "lr_groups": prompt.dept_lr_groups(0.1)}),
    ({"method": "lofit"}, {"lr": 5e-2}),
], ids=["prefix", "dept", "lofit"])
def test_step_lowers_loss_and_keeps_base(peft_cfg, optim):
  """Sharded over the 8 fake devices, 5 steps on one batch."""
  cfg = tiny_config(peft=peft_cfg, optim={**optim, "schedule": "constant"})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  frozen0 = jax.device_get(state.frozen)
  step = setup.jit_train_step(run, 1)
  batch = data.to_global(random_batch(0), run.mesh, run.batch_sharding)
  losses = []
  for _ in range(5):
    state, m = step(state, batch, jax.random.PRNGKey(0))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.01, losses
  for a, b in zip(jax.tree.leaves(frozen0),
                  jax.tree.leaves(jax.device_get(state.frozen))):
    np.testing.assert_array_equal(a, b)
