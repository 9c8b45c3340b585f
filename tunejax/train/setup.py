"""Builds what a run needs from its config: model, tokenizer, state, steps."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tunejax import errors, losses, models, optim, peft, sharding
from tunejax.state import TrainState
from tunejax.train import step as step_lib
from tunejax.train.config import Config, ModelSection


def load_model(ms: ModelSection):
  """(ModelConfig, params or None). Presets are random-initialised later."""
  if ms.name in models.PRESETS:
    cfg, params = models.preset(ms.name), None
  else:
    if not (os.path.exists(ms.name) or ms.name == "gemma3-270m"):
      raise errors.ConfigError(
          f"config.model.name: '{ms.name}' is neither a preset "
          f"({sorted(models.PRESETS)}) nor an existing checkpoint path")
    cfg, params = models.load(ms.name, dtype=ms.param_dtype)
  fields = {f.name for f in dataclasses.fields(cfg)}
  for k in ms.overrides:
    if k not in fields:
      raise errors.ConfigError(
          f"config.model.overrides.{k}: not a ModelConfig field")
  cfg = dataclasses.replace(
      cfg, dtype=ms.dtype, param_dtype=ms.param_dtype, remat=ms.remat,
      scan_layers=ms.scan_layers, **ms.overrides)
  if params is not None:
    params = jax.tree.map(lambda x: x.astype(ms.param_dtype), params)
  return cfg, params


def load_tokenizer(ms: ModelSection):
  from tunejax import tokenizers  # pylint: disable=g-import-not-at-top
  path = ms.tokenizer or ms.name
  if path == "byte":
    from tunejax.tokenizers.byte import ByteTokenizer  # pylint: disable=g-import-not-at-top
    return ByteTokenizer()
  return tokenizers.load(path)


def make_apply(model_cfg, method: peft.Method):
  """apply(params, frozen, batch, rng) -> losses.Head."""
  def apply(params, frozen, batch, rng):
    base, adapters = method.assemble(params, frozen, rng)
    h = models.hidden(model_cfg, base, batch["tokens"], batch["positions"],
                      batch["segment_ids"], adapters=adapters,
                      seam=method.seam)
    return losses.Head(h, models.unembedding(model_cfg, base),
                       model_cfg.final_logit_softcap)
  return apply


def make_loss(name: str, options: dict):
  fn = functools.partial(losses.get(name), **options)
  return lambda head, batch: fn(head, batch, ref=None)


class Run(NamedTuple):
  """The static pieces of a run, built once."""
  model_cfg: Any
  method: peft.Method
  tx: optax.GradientTransformation
  lr_schedule: Any
  mesh: Any
  rules: dict
  state_shardings: Any
  batch_sharding: NamedSharding
  apply_fn: Any
  loss_fn: Any


def create_state(cfg: Config, model_cfg, params, method, mesh, rules):
  """Builds the TrainState directly sharded (shapes from `eval_shape`).

  Returns (state, state_shardings, tx, lr_schedule).
  """
  rng = jax.random.PRNGKey(cfg.seed)
  k_init, k_peft = jax.random.split(jax.random.fold_in(rng, 1))
  model_axes = models.param_axes(model_cfg)
  repl = NamedSharding(mesh, P())
  if params is None:
    make_params = lambda: models.init(model_cfg, k_init)
  else:
    model_sh = sharding.tree_shardings(model_axes, params, mesh, rules)
    params = jax.device_put(params, model_sh)
    make_params = lambda: params
  abstract_params = jax.eval_shape(make_params)
  abstract_t, _ = jax.eval_shape(method.init, k_peft, abstract_params)
  tx, sched = optim.make_tx(cfg.optim, abstract_t, cfg.total_steps)

  def make():
    t, f = method.init(k_peft, make_params())
    return TrainState(step=jnp.zeros((), jnp.int32), params=t, frozen=f,
                      opt_state=tx.init(t), rng=rng)

  abstract = jax.eval_shape(make)
  t_axes, f_axes = method.axes(model_axes)
  t_sh = sharding.tree_shardings(t_axes, abstract.params, mesh, rules)
  f_sh = sharding.tree_shardings(f_axes, abstract.frozen, mesh, rules)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, t_sh,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  state_sh = TrainState(step=repl, params=t_sh, frozen=f_sh,
                        opt_state=opt_sh, rng=repl)
  state = jax.jit(make, out_shardings=state_sh)()
  return state, state_sh, tx, sched


def build(cfg: Config, model_cfg, params) -> tuple[TrainState, Run]:
  mesh = sharding.make_mesh(
      {a: getattr(cfg.mesh, a) for a in sharding.MESH_AXES})
  rules = sharding.resolve_rules(cfg.mesh.rules)
  method = peft.get(cfg.peft)
  with sharding.use_rules(mesh, cfg.mesh.rules):
    state, state_sh, tx, sched = create_state(
        cfg, model_cfg, params, method, mesh, rules)
  run = Run(model_cfg=model_cfg, method=method, tx=tx, lr_schedule=sched,
            mesh=mesh, rules=rules, state_shardings=state_sh,
            batch_sharding=sharding.batch_sharding(mesh, rules),
            apply_fn=make_apply(model_cfg, method),
            loss_fn=make_loss(cfg.loss.name, cfg.loss.options))
  return state, run


def jit_train_step(run: Run, micro_batches: int):
  fn = functools.partial(step_lib.train_step, apply_fn=run.apply_fn,
                         loss_fn=run.loss_fn, tx=run.tx,
                         micro_batches=micro_batches)
  repl = NamedSharding(run.mesh, P())
  return jax.jit(fn, in_shardings=(run.state_shardings, run.batch_sharding,
                                   repl),
                 out_shardings=(run.state_shardings, repl),
                 donate_argnums=0)


def jit_eval_step(run: Run):
  fn = functools.partial(step_lib.eval_step, apply_fn=run.apply_fn,
                         loss_fn=run.loss_fn)
  sh = run.state_shardings
  repl = NamedSharding(run.mesh, P())
  return jax.jit(fn, in_shardings=(sh.params, sh.frozen, run.batch_sharding),
                 out_shardings=repl)
