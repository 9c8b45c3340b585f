"""Orbax checkpoints of the train state, data-iterator state and config.

Each save holds `state` (the TrainState pytree, sharded), `data` (the input
iterator's JSON state) and `config` (the resolved config). Orbax writes to
a temporary directory and renames on commit, so a killed save never looks
finished; a checkpoint that is finished but unreadable (e.g. a truncated
file) is detected at restore and the previous one is used, with a warning.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from tunejax import errors


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with fallback on restore."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise errors.CheckpointError(
          f"{self.directory}: cannot create checkpoint dir: {e}") from None

  def save(self, step: int, state, data_state: dict | None, config: dict,
           *, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(config))
    return self._mngr.save(step, args=args, force=force)

  def wait(self):
    self._mngr.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint, or None.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings, so
    every array is restored directly onto its shards.
    """
    for step in reversed(self.steps()):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["data"] or {})
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types for damaged files; any of them means this
        # checkpoint is unusable, and an older one may still be fine.
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                        "moved aside to %d.corrupt, trying the previous one",
                        step, self.directory, type(e).__name__,
                        (str(e).splitlines() or [""])[0][:200], step)
        self._set_aside(step)
    return None

  def _set_aside(self, step: int):
    """Renames a damaged step dir so the resumed run can save that step."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = f"{src}.corrupt"
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.replace(src, dst)
    self._mngr.reload()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract(tree_, shardings=None):
  """ShapeDtypeStructs (with shardings) for restoring `tree_`."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree_)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree_, shardings)
