import jax, numpy as np, pytest
from tunejax import data, tree
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config

@pytest.mark.parametrize("name", ["lora", "dora", "pissa", "olora"])
def test_run(name):
  cfg = tiny_config(peft={"method": name, "rank": 4, "alpha": 8.0}, optim={"lr": 1e-2})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  step = setup.jit_train_step(run, 1)
  for i in range(3):
    b = data.to_global(random_batch(i % 2), run.mesh, run.batch_sharding)
    state, m = step(state, b, jax.random.PRNGKey(0))
  print(name, float(m["loss"]), flush=True)
