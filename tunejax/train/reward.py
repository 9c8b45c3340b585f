"""task=reward: a Bradley-Terry reward model (scalar head on the last token).

  python -m tunejax.main --config=configs/tiny_dpo.py:task=reward --workdir=W

Trains the backbone (any `peft.method`; 'none' = full fine-tuning) plus a
scalar head {'w': [D], 'b': []} on `data.format='preference'` pairs with
−log σ(r(y_w) − r(y_l)) (`tunejax.losses.reward`), logs loss / accuracy /
margin, evaluates pairwise accuracy on the eval pairs before and after
(`eval/accuracy`), and saves W/export/reward: an HF checkpoint of the
(merged) backbone plus `reward_head.safetensors`
(`score.weight` [1, D], `score.bias` [1]).

Scoring API:
  rm = load(path)                                     # RewardModel
  score_texts(rm, tokenizer, prompts, responses)      # np.ndarray [n]
  score(rm, tokens_BxL, positions_BxL, segment_ids_BxL)  # [B, L + 1] slots

Single-program jit (no mesh): reward models here are small; the policy
trainer is the sharded one.
"""
from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import numpy as st_np

from tunejax import data, errors, losses, models, optim, peft
from tunejax.losses import preference as pref
from tunejax.losses import reward as rw
from tunejax.train.config import Config, eval_data
from tunejax.train.metrics import MetricsWriter, Throughput

HEAD_FILE = "reward_head.safetensors"


class RewardModel(NamedTuple):
  model_cfg: Any
  params: dict      # plain model params (adapters merged)
  head: dict        # {'w': [D], 'b': []}


def init_head(model_cfg) -> dict:
  # Zero init: every reward starts at 0 and the first steps move the head.
  return {"w": jnp.zeros((model_cfg.d_model,), jnp.float32),
          "b": jnp.zeros((), jnp.float32)}


def _hidden(model_cfg, base, adapters, seam, tokens, positions, segment_ids):
  return models.hidden(model_cfg, base, tokens, positions, segment_ids,
                       adapters=adapters, seam=seam)


def pair_rewards(model_cfg, method, trainable, frozen, batch):
  """(r_w, r_l, valid), each [B, L + 1] slots, for a preference batch."""
  base, adapters = method.assemble(trainable["backbone"], frozen)
  h = _hidden(model_cfg, base, adapters, method.seam,
              *losses.model_inputs(batch))
  h_w, h_l = pref.deinterleave(h)
  seg_w, seg_l = batch["chosen_segment_ids"], batch["rejected_segment_ids"]
  r_w = rw.sequence_scores(h_w, seg_w, trainable["head"])
  r_l = rw.sequence_scores(h_l, seg_l, trainable["head"])
  return r_w, r_l, rw.segment_present(seg_w) * rw.segment_present(seg_l)


def _loss(trainable, frozen, batch, *, model_cfg, method):
  loss_sum, n, aux = rw.bradley_terry(*pair_rewards(
      model_cfg, method, trainable, frozen, batch))
  return loss_sum / jnp.maximum(n, 1.0), (n, aux)


def _means(loss, n, aux):
  out = {"loss": loss}
  out.update({k[:-4]: v / jnp.maximum(n, 1.0) for k, v in aux.items()})
  return out


def _train_step(trainable, opt_state, frozen, batch, *, tx, loss_fn):
  (loss, (n, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      trainable, frozen, batch)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  metrics = {**_means(loss, n, aux), "grad_norm": optax.global_norm(grads)}
  return optax.apply_updates(trainable, updates), opt_state, metrics


def _evaluate(cfg, loss_fn, trainable, frozen, tokenizer) -> dict:
  """Pairwise accuracy / loss over the eval pairs (pair-weighted)."""
  it = data.make_iterator(eval_data(cfg), tokenizer, seed=cfg.seed + 1)
  tot = {"loss": 0.0, "n": 0.0, "accuracy_sum": 0.0}
  for _, batch in zip(range(cfg.eval.batches), it):
    loss, (n, aux) = loss_fn(trainable, frozen, batch)
    tot["loss"] += float(loss) * float(n)
    tot["n"] += float(n)
    tot["accuracy_sum"] += float(aux["accuracy_sum"])
  n = max(tot["n"], 1.0)
  return {"eval/loss": tot["loss"] / n, "eval/accuracy":
          tot["accuracy_sum"] / n}


def train(cfg: Config, workdir: str, model_cfg, params, tokenizer) -> dict:
  """Trains and saves a reward model; returns metrics and the model."""
  if cfg.data.format != "preference":
    raise errors.ConfigError("config.data.format: task=reward needs "
                             f"'preference', got {cfg.data.format!r}")
  k_init, k_peft = jax.random.split(jax.random.PRNGKey(cfg.seed))
  if params is None:
    params = models.init(model_cfg, k_init)
  method = peft.get(cfg.peft)
  backbone, frozen = method.init(k_peft, params)
  trainable = {"backbone": backbone, "head": init_head(model_cfg)}
  tx, sched = optim.make_tx(cfg.optim, trainable, cfg.total_steps)
  opt_state = tx.init(trainable)
  loss_fn = jax.jit(functools.partial(_loss, model_cfg=model_cfg,
                                      method=method))
  step_fn = jax.jit(functools.partial(
      _train_step, tx=tx, loss_fn=functools.partial(
          _loss, model_cfg=model_cfg, method=method)), donate_argnums=(0, 1))
  os.makedirs(workdir, exist_ok=True)
  writer = MetricsWriter(workdir, total_steps=cfg.total_steps,
                         tensorboard=cfg.log.tensorboard,
                         progress=cfg.log.progress)
  it = data.make_iterator(cfg.data, tokenizer, seed=cfg.seed)
  last = {}
  try:
    if cfg.eval.every >= 0:
      writer.write(0, _evaluate(cfg, loss_fn, trainable, frozen, tokenizer))
    rate = Throughput()
    for step in range(1, cfg.total_steps + 1):
      batch = next(it)
      trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen,
                                              batch)
      log_now = step % cfg.log.every == 0 or step == cfg.total_steps
      rate.step_done(float(np.sum(batch["chosen_segment_ids"] > 0)
                           + np.sum(batch["rejected_segment_ids"] > 0)),
                     metrics, log_now)
      if log_now:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last["lr"] = float(sched(step - 1))
        last.update(rate.row())
        writer.write(step, last)
      writer.advance()
    if cfg.eval.every >= 0:
      final = _evaluate(cfg, loss_fn, trainable, frozen, tokenizer)
      writer.write(cfg.total_steps, final)
      last.update(final)
  finally:
    writer.close()
  rm = RewardModel(model_cfg, method.merged(trainable["backbone"], frozen),
                   trainable["head"])
  out = os.path.join(workdir, "export", "reward")
  save(rm, out)
  return {"metrics": last, "reward_model": rm, "export": out}


def save(rm: RewardModel, out_dir: str) -> str:
  """HF checkpoint of the backbone + the head file, in `out_dir`."""
  models.save_hf(rm.model_cfg, jax.device_get(rm.params), out_dir)
  head = jax.device_get(rm.head)
  tmp = os.path.join(out_dir, HEAD_FILE + ".tmp")
  st_np.save_file({"score.weight": np.asarray(head["w"], np.float32)[None],
                   "score.bias": np.asarray(head["b"], np.float32)[None]},
                  tmp)
  os.replace(tmp, os.path.join(out_dir, HEAD_FILE))
  return out_dir


def load(path: str, dtype: str | None = None) -> RewardModel:
  head_path = os.path.join(path, HEAD_FILE)
  if not os.path.exists(head_path):
    raise errors.CheckpointError(f"{head_path}: no reward head (not a "
                                 "reward model saved by tunejax)")
  model_cfg, params = models.load(path, dtype=dtype)
  t = st_np.load_file(head_path)
  head = {"w": jnp.asarray(t["score.weight"][0]),
          "b": jnp.asarray(t["score.bias"][0])}
  return RewardModel(model_cfg, params, head)


@functools.partial(jax.jit, static_argnums=0)
def _score(model_cfg, params, head, tokens, positions, segment_ids):
  h = _hidden(model_cfg, params, None, None, tokens, positions, segment_ids)
  return rw.sequence_scores(h, segment_ids, head)


def score(rm: RewardModel, tokens_BxL, positions_BxL, segment_ids_BxL):
  """Rewards of every (row, segment) slot of (packed) rows, [B, L + 1]."""
  return _score(rm.model_cfg, rm.params, rm.head, jnp.asarray(tokens_BxL),
                jnp.asarray(positions_BxL), jnp.asarray(segment_ids_BxL))


def score_texts(rm: RewardModel, tokenizer, prompts, responses, *,
                add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
  """One reward per (prompt, response), tokenized like the `preference`
  data format ([bos] prompt response [eos]; the model reads all but the
  final id, and the head reads the last input position)."""
  seqs = []
  for p, r in zip(prompts, responses):
    ids = ([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None
           else []) + tokenizer.encode(p) + tokenizer.encode(r)
    if add_eos and tokenizer.eos_id is not None:
      ids.append(tokenizer.eos_id)
    seqs.append(ids[:-1])
  n = max(len(s) for s in seqs)
  tokens = np.zeros((len(seqs), n), np.int32)
  seg = np.zeros((len(seqs), n), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], seg[i, :len(s)] = s, 1
  pos = np.broadcast_to(np.arange(n, dtype=np.int32), tokens.shape)
  return np.asarray(score(rm, tokens, pos, seg))[:, 1]
