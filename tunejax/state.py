"""The train state pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  `params` is the trainable subtree (adapters, sparse deltas, prompts, or
  the whole model for full fine-tuning); gradients are taken w.r.t. it only.
  `frozen` holds everything else and is passed as data, so it gets no
  optimizer state. `rng` is the base key; each step folds in `step`.
  `history` is None, or a past copy of `params` (EMA / snapshot, see
  `tunejax.train.history`) that some losses use as their reference.
  """
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array
  history: Any = None
