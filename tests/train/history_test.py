"""History model (EMA / snapshot of the trainable params) in the state."""
import jax
import numpy as np
import pytest

from tunejax import data, errors, losses
from tunejax.train import history, setup
from tests.train.helpers import random_batch, tiny_config

SGD = {"name": "sgd", "lr": 0.5, "clip_norm": 0.0}


def _numpy_history(spec, thetas):
  """h_0 = θ_0; h_{t+1} from h_t and θ_{t+1} (float64)."""
  h = thetas[0]
  for t, theta in enumerate(thetas[1:]):
    if spec.kind == "ema":
      h = spec.decay * h + (1 - spec.decay) * theta
    elif (t + 1) % spec.every == 0:
      h = theta
  return h


@pytest.mark.parametrize("spec", [history.History("ema", decay=0.7),
                                  history.History("snapshot", every=2)])
def test_update_rule_matches_numpy(spec):
  rs = np.random.RandomState(0)
  thetas = [rs.normal(size=(3, 2)) for _ in range(6)]
  h = history.init(spec, {"w": np.float32(thetas[0])})
  for t, theta in enumerate(thetas[1:]):
    h = history.update(spec, h, {"w": np.float32(theta)}, t)
  np.testing.assert_allclose(h["w"], _numpy_history(spec, thetas),
                             rtol=1e-5, atol=1e-6)


def test_bad_options_name_the_key():
  with pytest.raises(errors.ConfigError, match="history_decay"):
    history.from_loss_options({"history": "ema", "history_decay": 2.0})
  assert history.from_loss_options({"history": "ref"}) is None


def test_sstoken_trains_against_the_ema_of_its_own_params():
  """The state's history follows the EMA of the trained params, and the
  step's loss uses it as the reference (checked by recomputing the loss
  with an explicit reference head)."""
  opts = {"ratio": 0.5, "history": "ema", "history_decay": 0.6}
  cfg = tiny_config(loss={"name": "sstoken", "options": opts}, optim=SGD,
                    peft={"method": "lora", "rank": 2}, mesh={"data": 1})
  model_cfg, params = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  step = setup.jit_train_step(run, 1)
  thetas = [jax.device_get(state.params)]
  batches = [random_batch(i) for i in range(3)]
  for b in batches:
    g = data.to_global(b, run.mesh, run.batch_sharding)
    hist_before = jax.device_get(state.history)
    params_before = jax.device_get(state.params)
    frozen = jax.device_get(state.frozen)
    state, m = step(state, g, jax.random.PRNGKey(0))
    thetas.append(jax.device_get(state.params))
  # The last step's loss, recomputed with h_2 as the reference.
  policy, _ = run.apply_fn(params_before, frozen, batches[-1], None)
  ref, _ = run.apply_fn(hist_before, frozen, batches[-1], None)
  s, d, _ = losses.get("sstoken")(policy, batches[-1], ref=ref, ratio=0.5)
  np.testing.assert_allclose(float(m["loss"]), float(s / d), rtol=1e-5)
  spec = history.History("ema", decay=0.6)
  flat = lambda t: jax.tree.leaves(t)
  for i, got in enumerate(flat(jax.device_get(state.history))):
    want = _numpy_history(spec, [np.float64(flat(t)[i]) for t in thetas])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # It moved away from the initial adapters and differs from the params.
  assert any(not np.allclose(a, b) for a, b in zip(
      flat(state.history), flat(thetas[0])))
