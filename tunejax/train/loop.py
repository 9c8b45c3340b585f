"""The host loop: data -> jitted step -> metrics, eval, checkpoints."""
from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tunejax import data, errors, optim, peft, sharding
from tunejax.checkpoint import Checkpointer, abstract
from tunejax.train import evaluate, setup
from tunejax.train.config import Config, eval_data
from tunejax.train.metrics import MetricsWriter, Throughput


class _Preemption:
  """SIGTERM (TPU preemption, SLURM) sets a flag; the loop saves and exits."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. notebooks): no handler
      self._old = None
    return self

  def _handle(self, *_):
    logging.warning("SIGTERM: saving a checkpoint and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _host_metrics(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def data_iterator(data_cfg, tokenizer, seed):
  """This process's share of the configured data, as training reads it."""
  return data.make_iterator(data_cfg, tokenizer, seed=seed,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())


def _restore(ckpt: Checkpointer, state, run, it) -> tuple[object, int]:
  found = ckpt.restore_latest(abstract(state, run.state_shardings))
  if found is None:
    return state, 0
  step, state, data_state = found
  if data_state:
    it.set_state(data_state)
  logging.info("resumed from step %d", step)
  return state, step


def _log_row(run, cfg: Config, m: dict, step: int, rate: dict):
  m["lr"] = float(run.lr_schedule(step - 1))
  m.update(rate)
  m["tokens_per_sec"] *= jax.process_count()  # each host counts its own
  flops = run.model_cfg.flops_per_token(
      cfg.data.seq_len, weight_grads=run.method.trains_base_weights
  ) * m["tokens_per_sec"]
  m["tflops"] = flops / 1e12
  if cfg.log.peak_tflops:
    m["mfu"] = m["tflops"] / (cfg.log.peak_tflops * jax.device_count())
  return m


def event_context(cfg: Config, run, it) -> peft.EventContext:
  """What PEFT methods' host events (mask selection, drop/grow) may use."""
  def objective(params, frozen, batch, rng):
    if rng is not None:
      batch = {**batch, "rng": rng}
    with sharding.use_rules(run.mesh, run.rules):
      loss_sum, denom, _ = run.loss_fn(
          run.apply_fn(params, frozen, batch, rng), batch)
    return loss_sum / jnp.maximum(denom, 1e-8)
  return peft.EventContext(
      objective=objective,
      next_batch=lambda: data.to_global(next(it), run.mesh,
                                        run.batch_sharding),
      state_shardings=run.state_shardings, tx=run.tx,
      make_tx=lambda t: optim.make_tx(cfg.optim, t, cfg.total_steps)[0],
      total_steps=cfg.total_steps, model_cfg=run.model_cfg)


def _steps(cfg: Config, run, state, it, ckpt, writer, evaluator, start: int):
  """The step loop. Returns (state, last logged metrics, preempted)."""
  events = event_context(cfg, run, it)
  config_json = dataclasses.asdict(cfg)
  step_fn = setup.jit_train_step(run, cfg.micro_batches)
  base_rng = jax.random.PRNGKey(cfg.seed)
  last, rate = {}, Throughput()
  with _Preemption() as pre:
    for step in range(start + 1, cfg.total_steps + 1):
      batch = next(it)
      gbatch = data.to_global(batch, run.mesh, run.batch_sharding)
      state, metrics = step_fn(state, gbatch, base_rng)
      state = run.method.on_step(state, step, events)
      log_now = step % cfg.log.every == 0 or step == cfg.total_steps
      # Every processed token (both sides of preference pairs).
      rate.step_done(float(sum(np.sum(v > 0) for k, v in batch.items()
                               if k.endswith("segment_ids"))),
                     metrics, log_now)
      if log_now:
        m = _host_metrics(metrics)
        if not np.isfinite(m["loss"]):
          raise errors.NonFiniteLossError(
              f"step {step}: loss is {m['loss']} (grad_norm "
              f"{m.get('grad_norm')}); lower config.optim.lr or check data")
        last = _log_row(run, cfg, m, step, rate.row())
        writer.write(step, last)
      writer.advance()
      if cfg.eval.every > 0 and step % cfg.eval.every == 0:
        with rate.pause(state):
          writer.write(step, evaluator(state))
      save_now = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
      if save_now or pre.requested or step == cfg.total_steps:
        with rate.pause(state):
          ckpt.save(step, state, it.get_state(), config_json, force=True)
      if pre.requested:
        break
  return state, last, pre.requested


def train(cfg: Config, workdir: str, model_cfg, params, tokenizer,
          annotate=None) -> dict:
  """Runs `cfg.total_steps` optimizer steps; returns the final state/run.

  Eval runs before training (unless resumed), every `eval.every` steps and
  at the end (`eval.every=-1`: never).
  """
  state, run = setup.build(cfg, model_cfg, params)
  del params
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  it = data_iterator(cfg.data, tokenizer, cfg.seed)
  if annotate is not None:  # adds host-side arrays to batches (task=dpo)
    it = annotate(it)
  start = 0
  if cfg.checkpoint.resume:
    state, start = _restore(ckpt, state, run, it)
  if start == 0:  # e.g. data-driven sparse masks, LT-SFT's first phase
    state = run.method.on_start(state, event_context(cfg, run, it))
  writer = MetricsWriter(workdir, total_steps=cfg.total_steps,
                         start_step=start, tensorboard=cfg.log.tensorboard,
                         progress=cfg.log.progress)
  evaluator = evaluate.Evaluator(cfg, run, tokenizer, eval_data(cfg),
                                 annotate=annotate)
  try:
    if start == 0 and cfg.eval.every >= 0:
      writer.write(0, evaluator(state))
    state, last, preempted = _steps(cfg, run, state, it, ckpt, writer,
                                    evaluator, start)
    periodic = cfg.eval.every > 0 and cfg.total_steps % cfg.eval.every == 0
    if (not preempted and cfg.eval.every >= 0 and cfg.total_steps > start
        and not periodic):
      writer.write(cfg.total_steps, evaluator(state))
  finally:  # pending async saves finish; files are flushed and closed
    ckpt.close()
    writer.close()
  _write_summary(workdir, last)
  return {"state": state, "run": run, "metrics": last, "preempted": preempted}


def _write_summary(workdir, last):
  if jax.process_index() == 0 and last:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(last, f, indent=1)
