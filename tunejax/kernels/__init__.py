"""Fused token-loss ops over (hidden states, unembedding) pairs."""
from tunejax.kernels.token_stats import TokenStats
from tunejax.kernels.token_stats import token_stats
from tunejax.kernels.divergence import token_kl
from tunejax.kernels.sampling import sample_candidates
