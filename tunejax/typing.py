"""Shared type aliases and dimension letters.

Dimension letters used in shape-suffixed names (`h_BxLxD`):
  B batch, L length (sequence), D model width, H query heads, G kv heads,
  K head dim, V vocabulary, F feed-forward width, R adapter rank,
  N flattened tokens, E experts.
"""
from typing import Any, Mapping

import jax

PyTree = Any
Params = dict  # plain nested dict of arrays
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
