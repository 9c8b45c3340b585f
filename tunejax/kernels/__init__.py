"""Fused token-loss ops over (hidden states, unembedding) pairs.

token_stats: per-token log-prob / logsumexp / entropy / smoothing term.
token_loss: a scalar loss of per-token statistics whose gradient is formed
  in the forward pass (three matmul passes instead of four);
  `cross_entropy_terms` is its SFT cross-entropy.
token_kl: per-token full-vocabulary KL between a policy and a reference.
sample_candidates: Gumbel-top-k candidate tokens with their log-probs.
None of them materialises `[N, V]` logits.
"""
from tunejax.kernels.divergence import token_kl
from tunejax.kernels.sampling import sample_candidates
from tunejax.kernels.token_loss import cross_entropy_terms
from tunejax.kernels.token_loss import token_loss
from tunejax.kernels.token_stats import TokenStats
from tunejax.kernels.token_stats import token_stats
