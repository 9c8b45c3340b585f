"""T-REG's self-generated token rewards, precomputed by contrastive prompting.

T-REG (Zhou et al., "T-REG: Preference Optimization with Token-Level Reward
Regularization", ACL 2025, arXiv 2412.02685) regularises DPO with token
rewards that the model generates itself: the evaluator scores each response
token under a prompt asking for a better answer and under one asking for a
worse answer,

  r̂_t = σ(log π(y_t | x_better, y_<t) − log π(y_t | x_worse, y_<t)) − 0.5

(`losses.token_pref.contrastive_token_rewards`; reference/verified-formulas
§8, SECONDARY: the paper's exact prompt text is not public, so the
instructions are config fields). The evaluator here is the frozen initial
model (the DPO reference), so the rewards are one pass over the data before
training, stored like the precomputed reference log-probs
(`tunejax.train.preference.RefTable`, W/treg_rewards.npz, keyed by a hash
of each pair's tokens) and added to training and eval batches as
`chosen_token_rewards` / `rejected_token_rewards` [B, L].

Contrastive inputs are built at the token level from the batch itself: the
tokenized instruction (`loss.treg_better_prompt` / `loss.treg_worse_prompt`)
is inserted after BOS, before the prompt, of every pair side; the response
ids are untouched, so reward t lands exactly on response target t.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tunejax import data
from tunejax.data import packing
from tunejax.losses import preference as pref
from tunejax.losses import token_pref
from tunejax.train import preference, setup
from tunejax.train.config import Config

TABLE = "treg_rewards.npz"
FIELD = "token_rewards"
ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def contrastive_doc(tokens_N, targets_N, mask_N, instr_ids, bos_id):
  """One pair side's document with `instr_ids` inserted before its prompt.

  Inputs are the side's shifted segment (`targets[i]` follows `tokens[i]`).
  The ids are `tokens + [targets[-1]]`; the instruction goes after a leading
  BOS (else first). Returns a `data.formats.Doc` (tokens, targets,
  loss_mask, weights) whose trained targets are the same response ids.
  """
  ids = np.concatenate([tokens_N, targets_N[-1:]]).astype(np.int32)
  trained = np.concatenate([[0.0], mask_N]).astype(np.float32)  # per id
  at = 1 if bos_id is not None and ids[0] == bos_id else 0
  instr = np.asarray(instr_ids, np.int32)
  ids = np.concatenate([ids[:at], instr, ids[at:]])
  trained = np.concatenate([trained[:at], np.zeros(len(instr), np.float32),
                            trained[at:]])
  return (ids[:-1], ids[1:], trained[1:], np.ones(len(ids) - 1, np.float32))


def _side(batch, side, i, sel):
  return tuple(batch[f"{side}_{k}"][i][sel]
               for k in ("tokens", "targets", "loss_mask"))


def contrastive_units(batch, better_ids, worse_ids, bos_id):
  """[(row, side, segment selection, (better doc, worse doc))] per pair
  side of a preference batch."""
  out = []
  for i, sw, sl, _ in preference.pairs_of(batch):
    for side, sel in zip(pref.SIDES, (sw, sl)):
      seg = _side(batch, side, i, sel)
      out.append((i, side, sel, (contrastive_doc(*seg, better_ids, bos_id),
                                 contrastive_doc(*seg, worse_ids, bos_id))))
  return out


def _pack(units, seq_len, pad_id, rows_per_call):
  """Packs (better, worse) units into `[R, seq_len]` preference-style rows
  (better as `chosen_*`, worse as `rejected_*`), R a multiple of
  `rows_per_call` that every host agrees on (each jitted call is global).
  Returns (batch, [(row, segment id)] per unit); batch None if R = 0."""
  # `pack` bins with this same deterministic call, so its row r, segment
  # k + 1 holds unit bins[r][k].
  bins = packing.best_fit_decreasing(
      [packing.unit_length(u) for u in units], seq_len)
  rows = packing.pack(units, seq_len, pad_id, packing=True)
  where = [None] * len(units)
  for r, b in enumerate(bins):
    for k, u in enumerate(b):
      where[u] = (r, k + 1)
  calls = -(-len(rows) // rows_per_call)
  if jax.process_count() > 1:
    calls = int(np.max(multihost_utils.process_allgather(np.int32(calls))))
  if not calls:
    return None, where
  rows += [packing.empty_row(2, seq_len, pad_id)] * (
      calls * rows_per_call - len(rows))
  batch = {f"{side}_{k}": np.stack([row[j][k] for row in rows])
           for j, side in enumerate(pref.SIDES) for k in ROW_KEYS}
  return batch, where


class Scorer:
  """Token rewards of the frozen initial model for preference batches."""

  def __init__(self, cfg: Config, model_cfg, params, tokenizer):
    self.state, self.run = setup.build(cfg, model_cfg, params)
    self._fn = preference.logps_fn(self.run)
    self._better = tokenizer.encode(cfg.loss.treg_better_prompt)
    self._worse = tokenizer.encode(cfg.loss.treg_worse_prompt)
    self._bos, self._pad = tokenizer.bos_id, model_cfg.pad_id
    self._form = cfg.loss.treg_reward
    # Every contrastive document fits: the instruction adds its ids to at
    # most seq_len targets.
    self._len = cfg.data.seq_len + max(len(self._better), len(self._worse))

  def _logps(self, packed, rows: int):
    """(better, worse) per-token log-probs [R, L'] of packed rows, `rows`
    at a time (the data batch's row count: a valid batch sharding)."""
    outs = []
    for s in range(0, packed["chosen_tokens"].shape[0], rows):
      part = {k: v[s:s + rows] for k, v in packed.items()}
      g = data.to_global(part, self.run.mesh, self.run.batch_sharding)
      outs.append(jax.device_get(self._fn(self.state.params,
                                          self.state.frozen, g)))
    return tuple(np.concatenate([o[j] for o in outs]) for j in (0, 1))

  def rewards(self, batch):
    """(chosen, rejected) token rewards [B, L] of a preference batch, 0
    where not a response target."""
    rows = batch["chosen_tokens"].shape[0]
    units = contrastive_units(batch, self._better, self._worse, self._bos)
    out = {side: np.zeros(batch[f"{side}_tokens"].shape, np.float32)
           for side in pref.SIDES}
    packed, where = _pack([u for *_, u in units], self._len, self._pad,
                          rows)
    if packed is None:
      return out["chosen"], out["rejected"]
    lp_better, lp_worse = self._logps(packed, rows)
    picked = {s: [] for s in pref.SIDES}  # the response targets, in order
    for r, k in where:
      for s, lp in zip(pref.SIDES, (lp_better, lp_worse)):
        m = (packed[f"{s}_segment_ids"][r] == k) & (
            packed[f"{s}_loss_mask"][r] > 0)
        picked[s].append(lp[r][m])
    if units:  # one call over all tokens (the formula lives in losses)
      reward = np.asarray(token_pref.contrastive_token_rewards(
          np.concatenate(picked["chosen"]),
          np.concatenate(picked["rejected"]), form=self._form), np.float32)
      ends = np.cumsum([len(x) for x in picked["chosen"]])[:-1]
      for (i, side, sel, _), r_t in zip(units, np.split(reward, ends)):
        out[side][i][sel & (batch[f"{side}_loss_mask"][i] > 0)] = r_t
    return out["chosen"], out["rejected"]


def compute(cfg: Config, model_cfg, params, tokenizer) -> preference.RefTable:
  """T-REG token rewards over `preference.host_batches`."""
  scorer = Scorer(cfg, model_cfg, params, tokenizer)
  table = preference.RefTable(field=FIELD, meta=meta(cfg))
  for batch in preference.host_batches(cfg, tokenizer):
    table.add(batch, *scorer.rewards(batch))
  logging.info("T-REG token rewards of %d pairs", len(table.entries))
  return table


def meta(cfg: Config) -> str:
  """What the stored rewards depend on besides data and initial model."""
  return json.dumps({"better": cfg.loss.treg_better_prompt,
                     "worse": cfg.loss.treg_worse_prompt,
                     "reward": cfg.loss.treg_reward}, sort_keys=True)


def reward_table(cfg: Config, workdir: str, model_cfg, params,
                 tokenizer) -> preference.RefTable:
  """The workdir's stored T-REG rewards, or freshly computed ones."""
  return preference.stored_table(
      workdir, TABLE, lambda: compute(cfg, model_cfg, params, tokenizer),
      meta(cfg))
