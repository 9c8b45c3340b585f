"""VeRA through the real train step: loss decreases, only λ vectors train."""
import jax
import numpy as np

from tunejax import data, tree
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config


def test_vera_trains_only_lambda_vectors():
  cfg = tiny_config(peft={"method": "vera", "rank": 8},
                    optim={"lr": 5e-2}, mesh={"data": 1})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  frozen0 = jax.device_get(state.frozen)
  params0 = jax.device_get(state.params)
  step = setup.jit_train_step(run, 1)
  losses = []
  for _ in range(5):
    b = data.to_global(random_batch(0), run.mesh, run.batch_sharding)
    state, met = step(state, b, jax.random.PRNGKey(0))
    losses.append(float(met["loss"]))
  assert losses[-1] < losses[0] - 0.01
  names = set(tree.flatten(state.params))
  assert names and all(n.endswith(("vera_lambda_d", "vera_lambda_b"))
                       for n in names)
  changed = [n for n, v in tree.flatten(state.params).items()
             if np.abs(np.asarray(v) - tree.flatten(params0)[n]).max() > 0]
  assert any(n.endswith("vera_lambda_b") for n in changed)
  assert any(n.endswith("vera_lambda_d") for n in changed)
  # The shared random A/B and the base stay bit-identical.
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
