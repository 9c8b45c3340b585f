"""Optimizer chain: schedules, decay mask, lr groups, all optimizers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import config as config_lib, errors, optim


def _cfg(**kw):
  return config_lib.build(optim.OptimConfig, kw, "optim")


def test_warmup_cosine_matches_formula():
  cfg = _cfg(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
  sched = optim.schedule(cfg, total_steps=110)
  for s in (0, 5, 10, 60, 110):
    if s < 10:
      want = s / 10
    else:
      t = (s - 10) / 100
      want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    assert abs(float(sched(s)) - want) < 1e-6, s


def test_linear_and_constant():
  assert abs(float(optim.schedule(_cfg(lr=2.0, schedule="linear"), 10)(5))
             - 1.0) < 1e-6
  assert float(optim.schedule(_cfg(lr=2.0, schedule="constant"), 10)(7)) == 2.0


def _one_update(cfg, params, grads):
  tx, _ = optim.make_tx(cfg, params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_weight_decay_skips_norms_biases_embeddings():
  params = {"attn": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2)}, "embed": {"embedding": jnp.ones(2)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  up = _one_update(_cfg(name="sgd", lr=0.5, schedule="constant",
                        weight_decay=0.1, clip_norm=0.0), params, zeros)
  np.testing.assert_allclose(up["attn"]["kernel"], -0.05 * np.ones((2, 2)))
  for k in (up["attn"]["bias"], up["norm"]["scale"], up["embed"]["embedding"]):
    np.testing.assert_array_equal(k, 0.0)


def test_lr_groups_scale_updates():
  params = {"a": {"lora_a": jnp.ones(3)}, "b": {"lora_b": jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  up = _one_update(_cfg(name="sgd", lr=0.1, schedule="constant",
                        clip_norm=0.0, lr_groups=((".*lora_b", 16.0),)),
                   params, grads)
  np.testing.assert_allclose(up["a"]["lora_a"], -0.1)
  np.testing.assert_allclose(up["b"]["lora_b"], -1.6)


def test_clipping():
  params = {"w": jnp.zeros(4)}
  up = _one_update(_cfg(name="sgd", lr=1.0, schedule="constant",
                        clip_norm=1.0), params, {"w": jnp.full(4, 10.0)})
  np.testing.assert_allclose(np.linalg.norm(up["w"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_descends(name):
  target = jnp.arange(6.0).reshape(2, 3)
  params = {"w": jnp.zeros((2, 3))}
  cfg = _cfg(name=name, lr=0.05, schedule="constant", momentum=0.9)
  tx, _ = optim.make_tx(cfg, params, 100)
  state = tx.init(params)
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)
  l0 = loss(params)
  for _ in range(30):
    g = jax.grad(loss)(params)
    up, state = tx.update(g, state, params)
    params = jax.tree.map(jnp.add, params, up)
  assert loss(params) < 0.5 * l0


def test_bad_values_are_config_errors():
  with pytest.raises(errors.ConfigError, match="optim.name"):
    _cfg(name="adam2")
  with pytest.raises(errors.ConfigError, match="optim.lr"):
    _cfg(lr=-1.0)
  with pytest.raises(errors.ConfigError, match="lr_groups"):
    optim.make_tx(_cfg(lr_groups=(("nomatch.*", 2.0),)), {"w": jnp.ones(2)}, 5)
