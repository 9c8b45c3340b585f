"""Gumbel-top-k candidate sampling: frequencies follow the softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tunejax import kernels

# Every position has the same distribution, so N positions are N draws.
N, D, V, K = 4000, 8, 10, 3
SOFTCAP, TEMP = 2.0, 1.5


@pytest.fixture(scope="module")
def draws():
  rng = np.random.default_rng(0)
  h1 = rng.normal(size=(1, D))
  w = rng.normal(size=(D, V)) * 0.6
  h = jnp.asarray(np.repeat(h1, N, axis=0), jnp.float32)
  # block_v=4 makes three vocabulary chunks, the last one overlapping.
  ids, logp = kernels.sample_candidates(
      h, jnp.asarray(w, jnp.float32), jax.random.key(0), K, softcap=SOFTCAP,
      temperature=TEMP, block_n=512, block_v=4)
  s = SOFTCAP * np.tanh((h1 @ w)[0] / SOFTCAP) / TEMP
  p = np.exp(s - s.max())
  return np.asarray(ids), np.asarray(logp), p / p.sum()


def _chi2_pvalue(ids, probs):
  observed = np.bincount(ids, minlength=V)
  return stats.chisquare(observed, probs * len(ids)).pvalue


def test_first_candidate_follows_tempered_softmax(draws):
  ids, _, p = draws
  assert _chi2_pvalue(ids[:, 0], p) > 1e-3


def test_second_candidate_follows_sampling_without_replacement(draws):
  ids, _, p = draws
  # P(second = j) = sum_{i != j} p_i * p_j / (1 - p_i).
  second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(V) if i != j)
                     for j in range(V)])
  assert _chi2_pvalue(ids[:, 1], second) > 1e-3


def test_candidates_are_distinct_with_exact_log_probs(draws):
  ids, logp, p = draws
  assert ids.shape == (N, K) and ids.dtype == np.int32
  assert all(len(set(row)) == K for row in ids[:200])
  np.testing.assert_allclose(logp, np.log(p)[ids], atol=1e-5)
