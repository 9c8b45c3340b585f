"""Train-step invariants: accumulation, frozen params, sharding."""
import jax
import numpy as np
import pytest

from tunejax import data, tree
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config

# Plain SGD keeps parameter differences proportional to gradient
# differences (Adam's g/sqrt(v) amplifies float noise in tiny gradients).
SGD = {"name": "sgd", "lr": 0.5, "clip_norm": 0.0}


def _run_steps(cfg, batches):
  model_cfg, params = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  step = setup.jit_train_step(run, cfg.micro_batches)
  rng = jax.random.PRNGKey(0)
  losses = []
  for b in batches:
    state, m = step(state, data.to_global(b, run.mesh, run.batch_sharding),
                    rng)
    losses.append(float(m["loss"]))
  return state, run, losses


@pytest.fixture(scope="module")
def baseline():
  cfg = tiny_config(mesh={"data": 1}, optim=SGD)
  batches = [random_batch(i) for i in range(2)]
  return batches, _run_steps(cfg, batches)


def test_microbatches_equal_big_batch(baseline):
  batches, (state1, _, losses1) = baseline
  cfg = tiny_config(mesh={"data": 1}, micro_batches=4, optim=SGD)
  state4, _, losses4 = _run_steps(cfg, batches)
  np.testing.assert_allclose(losses4, losses1, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sharded_step_equals_single_device(baseline):
  batches, (state1, _, losses1) = baseline
  cfg = tiny_config(mesh={"data": 2, "fsdp": 2, "tensor": 2}, optim=SGD)
  state8, run, losses8 = _run_steps(cfg, batches)
  # The mesh is really used: some parameter is split across devices.
  specs = [s.spec for s in jax.tree.leaves(run.state_shardings.params)]
  assert any(any(a is not None for a in sp) for sp in specs)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_frozen_params_get_no_state_and_never_change():
  cfg = tiny_config(peft={"method": "freeze",
                          "trainable": (r"layers/mlp/.*",)})
  model_cfg, params = setup.load_model(cfg.model)
  state0, _ = setup.build(cfg, model_cfg, params)
  frozen0 = jax.device_get(state0.frozen)
  state, _, losses = _run_steps(cfg, [random_batch(i) for i in range(3)])
  assert set(tree.flatten(state.params)) == {
      "layers/mlp/down/kernel", "layers/mlp/gate/kernel",
      "layers/mlp/up/kernel"}
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Adam keeps exactly two moments per trainable value (+ scalar counts).
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state)
                if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(state.params))
  assert losses[-1] < losses[0]
