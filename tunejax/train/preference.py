"""task=dpo: preference optimisation, with online or precomputed reference.

`python -m tunejax.main --config=configs/tiny_dpo.py --workdir=W` trains
any preference loss (`dpo`, `simpo`, `orpo`, `tdpo`, `treg`) on
`data.format='preference'` batches through the ordinary train loop; the
model runs once over interleaved chosen/rejected rows
(`tunejax.losses.model_inputs`).

Reference log-probs (`loss.reference`):
  online       the frozen base (PEFT adapters off) in the same step.
  precomputed  one pass of the initial model over the training set (one
               epoch) and the eval batches before training, stored in
               W/ref_logps.npz and looked up by pair content on the host:
               training then needs no reference forward and no reference
               copy, so full fine-tuning DPO works. A resumed run reuses
               the stored table.
The table is keyed by a hash of each pair's token ids (both sides), so any
shuffling, packing or epoch serves the same values.

`loss.name='treg'` adds a second table of the same kind, T-REG's
contrastive-prompt token rewards (W/treg_rewards.npz, `tunejax.train.treg`);
the `annotate` hook adds every table's keys to training and eval batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import logging

from tunejax import data, errors, losses, sharding
from tunejax.losses import preference as pref
from tunejax.losses import token_pref
from tunejax.train import loop, setup
from tunejax.train.config import Config, eval_data

LOSSES = ("dpo", "simpo", "orpo", "tdpo", "treg")
TABLE = "ref_logps.npz"


def check(cfg: Config):
  if cfg.data.format != "preference":
    raise errors.ConfigError(
        f"config.data.format: task=dpo needs 'preference', got "
        f"{cfg.data.format!r}")
  if cfg.loss.name not in LOSSES:
    raise errors.ConfigError(
        f"config.loss.name: task=dpo needs a preference loss {LOSSES}, got "
        f"{cfg.loss.name!r}")
  if cfg.loss.treg_reward not in token_pref.REWARD_FORMS:
    raise errors.ConfigError(
        f"config.loss.treg_reward: expected one of {token_pref.REWARD_FORMS}, got "
        f"{cfg.loss.treg_reward!r}")
  if cfg.loss.reference == "precomputed" and cfg.loss.name == "tdpo":
    raise errors.ConfigError(
        "config.loss.reference: 'tdpo' needs full reference distributions "
        "per token; use 'online'")


def _segments(batch, side: str, i: int):
  """{segment id: boolean mask of its positions in row i}."""
  seg = batch[f"{side}_segment_ids"][i]
  return {int(k): seg == k for k in np.unique(seg) if k > 0}


def _key(batch, i, sel_w, sel_l) -> bytes:
  h = hashlib.blake2b(digest_size=16)
  for side, sel in (("chosen", sel_w), ("rejected", sel_l)):
    for k in ("tokens", "targets", "loss_mask"):
      h.update(np.ascontiguousarray(batch[f"{side}_{k}"][i][sel]).tobytes())
    h.update(b"|")
  return h.digest()


def pairs_of(batch):
  """Yields (row, segment selection chosen, selection rejected, key)."""
  for i in range(batch["chosen_tokens"].shape[0]):
    sw, sl = _segments(batch, "chosen", i), _segments(batch, "rejected", i)
    for k in sorted(set(sw) & set(sl)):
      yield i, sw[k], sl[k], _key(batch, i, sw[k], sl[k])


class RefTable:
  """Per-pair per-token arrays of the initial model, by pair content.

  Values cover each side's segment positions (0 where not a response
  target), so any packing of the pair gets them back exactly. `field` names the batch keys `annotate` adds:
  'ref_logp' (reference log-probs) or 'token_rewards' (T-REG,
  `tunejax.train.treg`). `meta` records what the values depend on beyond
  the data (e.g. T-REG's prompts), so a stale stored table is not reused.
  """

  def __init__(self, entries=None, field: str = "ref_logp", meta: str = ""):
    self.entries: dict[bytes, tuple[np.ndarray, np.ndarray]] = entries or {}
    self.field, self.meta = field, meta

  def add(self, batch, ref_w_BxL, ref_l_BxL):
    for i, sw, sl, key in pairs_of(batch):
      self.entries[key] = (np.asarray(ref_w_BxL[i][sw], np.float32),
                           np.asarray(ref_l_BxL[i][sl], np.float32))

  def annotate(self, batch) -> dict:
    """Adds `chosen_<field>` / `rejected_<field>` [B, L] to a batch."""
    out = {side: np.zeros(batch[f"{side}_tokens"].shape, np.float32)
           for side in pref.SIDES}
    for i, sw, sl, key in pairs_of(batch):
      if key not in self.entries:
        raise errors.DataError(
            f"precomputed {self.field}: a pair of the batch is not in the "
            "stored table (the data changed since it was written; delete "
            "it from the workdir)")
      out["chosen"][i][sw], out["rejected"][i][sl] = self.entries[key]
    return {**batch, f"chosen_{self.field}": out["chosen"],
            f"rejected_{self.field}": out["rejected"]}

  def save(self, path: str):
    keys = sorted(self.entries)
    flat = lambda j: [self.entries[k][j] for k in keys]
    lens = np.array([[len(a) for a in flat(0)], [len(a) for a in flat(1)]],
                    np.int64).reshape(2, -1)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, keys=np.array([np.frombuffer(k, np.uint8) for k in keys],
                                np.uint8).reshape(-1, 16),
             lens=lens, chosen=cat(flat(0)), rejected=cat(flat(1)),
             field=np.array(self.field), meta=np.array(self.meta))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "RefTable":
    z = np.load(path)
    field = str(z["field"]) if "field" in z else "ref_logp"
    meta = str(z["meta"]) if "meta" in z else ""
    offs = [np.concatenate([[0], np.cumsum(n)]) for n in z["lens"]]
    entries = {}
    for j, k in enumerate(z["keys"]):
      entries[k.tobytes()] = tuple(
          z[side][o[j]:o[j + 1]] for side, o in zip(pref.SIDES, offs))
    return cls(entries, field, meta)


class Annotated(Iterator[dict]):
  """A data iterator whose batches get the tables' per-token arrays."""

  def __init__(self, it, tables: Sequence[RefTable]):
    self._it, self._tables = it, tuple(tables)

  def __next__(self):
    batch = next(self._it)
    for table in self._tables:
      batch = table.annotate(batch)
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)

  def stats(self):
    return self._it.stats()


def logps_fn(run: setup.Run):
  """Jitted (params, frozen, batch) -> per-token log-probs of the model."""
  def fn(params, frozen, batch):
    with sharding.use_rules(run.mesh, run.rules):
      head, _ = run.apply_fn(params, frozen, batch, None)
      return pref.token_logps(head, batch)
  return jax.jit(fn)


def _batches(data_cfg, tokenizer, seed, limit=None):
  it = data.make_iterator(data_cfg, tokenizer, seed=seed,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  for n, batch in enumerate(it):
    if limit is not None and n >= limit:
      return
    yield batch


def host_batches(cfg: Config, tokenizer) -> Iterator[dict]:
  """What a precomputed pass covers: one epoch of the training data, in
  order, then the eval batches (this host's shard of each)."""
  sources = [(dataclasses.replace(cfg.data, num_epochs=1, shuffle=False),
              cfg.seed, None)]
  if cfg.eval.every >= 0:
    sources.append((eval_data(cfg), cfg.seed + 1, cfg.eval.batches))
  for data_cfg, seed, limit in sources:
    yield from _batches(data_cfg, tokenizer, seed, limit)


def precompute(cfg: Config, model_cfg, params, tokenizer) -> RefTable:
  """Reference log-probs of the initial model over `host_batches`."""
  state, run = setup.build(cfg, model_cfg, params)
  fn, table = logps_fn(run), RefTable()
  for batch in host_batches(cfg, tokenizer):
    g = data.to_global(batch, run.mesh, run.batch_sharding)
    ref_w, ref_l = jax.device_get(fn(state.params, state.frozen, g))
    table.add(batch, ref_w, ref_l)
  logging.info("precomputed reference log-probs of %d pairs",
               len(table.entries))
  return table


def stored_table(workdir: str, name: str, compute: Callable[[], RefTable],
                 meta: str = "") -> RefTable:
  """The table `name` of this workdir if it was made with the same `meta`,
  else `compute()`, stored there (per host under multi-host)."""
  if jax.process_count() > 1:  # each host: its shard
    name = f"{name[:-4]}.{jax.process_index()}.npz"
  path = os.path.join(workdir, name)
  if os.path.exists(path):
    table = RefTable.load(path)
    if table.meta == meta:
      return table
    logging.warning("%s was made with other settings; recomputing", path)
  table = compute()
  table.save(path)
  return table


def reference_table(cfg: Config, workdir: str, model_cfg, params,
                    tokenizer) -> RefTable:
  """The stored table of this workdir, or a freshly precomputed one."""
  return stored_table(workdir, TABLE, lambda: precompute(
      cfg, model_cfg, params, tokenizer))


def train(cfg: Config, workdir: str, model_cfg, params, tokenizer) -> dict:
  """Runs task=dpo; returns what `loop.train` returns."""
  check(cfg)
  losses.get(cfg.loss.name)
  tables = []
  if cfg.loss.reference == "precomputed":
    tables.append(reference_table(cfg, workdir, model_cfg, params,
                                  tokenizer))
  if cfg.loss.name == "treg":
    from tunejax.train import treg  # pylint: disable=g-import-not-at-top
    tables.append(treg.reward_table(cfg, workdir, model_cfg, params,
                                    tokenizer))
  annotate = (lambda it: Annotated(it, tables)) if tables else None
  return loop.train(cfg, workdir, model_cfg, params, tokenizer,
                    annotate=annotate)
