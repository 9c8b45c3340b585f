"""Loss registry: functions of arrays returning `(loss_sum, denom, aux)`.

A loss never sees the model. It receives the policy's `Head` (final hidden
states, unembedding, softcap) — so token statistics go through the fused
token-loss op and `[tokens, vocab]` logits never exist — the batch, and
optionally a reference `Head`. The train step divides once:
`loss = sum(loss_sum) / sum(denom)` over micro-batches and hosts, which keeps
gradient accumulation exactly token-weighted.
"""
from tunejax.losses.base import (Head, LossFn, get, names, prompt_keys,
                                 register)
from tunejax.losses import sft  # noqa: F401  (registers the SFT losses)
from tunejax.losses import rollout  # noqa: F401  (otr)
from tunejax.losses import token_select  # noqa: F401  (rho1, sstoken)
from tunejax.losses import preference  # noqa: F401  (dpo, simpo, orpo)
from tunejax.losses import token_pref  # noqa: F401  (tdpo, treg)
from tunejax.losses.preference import model_inputs

__all__ = ["Head", "LossFn", "get", "model_inputs", "names", "prompt_keys",
           "register"]
