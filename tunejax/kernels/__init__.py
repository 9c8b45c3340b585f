"""Fused token-loss ops over (hidden states, unembedding) pairs."""
from tunejax.kernels.token_stats import TokenStats
from tunejax.kernels.token_stats import token_stats
