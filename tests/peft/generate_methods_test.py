"""KV-cache generation through every weight- and activation-space method.

RL rollouts sample from the adapted policy, so the decode path (per-layer
split weights, cache) must apply each method exactly as the cache-free
forward does. Reference: teacher-forced hidden states on prompt + generated
tokens with the same (perturbed, non-trivial) adapters, in float64.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunejax import models
from tests.peft.common import make_method

CFG = models.preset("tiny-gemma3")  # Local + global layers, window 8.
PROMPTS = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
METHODS = [
    dict(method="lora", rank=4),
    dict(method="dora", rank=4),
    dict(method="vera", rank=8),
    dict(method="moe_lora", rank=4),
    dict(method="qlora", rank=4),
    dict(method="ia3"),
    dict(method="kasa", rank=4),
    dict(method="sparse", sparse_k=40),
    dict(method="lofit"),
]


@functools.partial(jax.jit, static_argnums=(2,))
def _hidden(base, ad, seam, tokens):
  return models.hidden(CFG, base, tokens, adapters=ad, seam=seam)


@pytest.fixture(scope="module")
def params():
  return models.init(CFG, jax.random.PRNGKey(0))


def _perturbed(method, params):
  t, f = method.init(jax.random.PRNGKey(2), params)
  leaves, tdef = jax.tree.flatten(t)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  t = tdef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                      for x, k in zip(leaves, keys)])
  return method.assemble(t, f)


@pytest.mark.parametrize("kw", METHODS, ids=[m["method"] for m in METHODS])
def test_generation_equals_teacher_forced_forward(params, kw):
  m = make_method(**kw)
  base, ad = _perturbed(m, params)
  out = models.generate(CFG, base, PROMPTS, 6, adapters=ad, seam=m.seam,
                        eos_id=-1)
  w = np.asarray(models.unembedding(CFG, base), np.float64)
  for i, p in enumerate(PROMPTS):
    new = [int(t) for t in np.asarray(out.tokens_BxT[i])]
    h = _hidden(base, ad, m.seam, jnp.asarray([p + new]))
    logits = np.asarray(h[0, len(p) - 1:-1], np.float64) @ w
    assert list(logits.argmax(-1)) == new
    top = logits.max(-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    np.testing.assert_allclose(np.asarray(out.logps_BxT[i]), top - lse,
                               atol=1e-4)
