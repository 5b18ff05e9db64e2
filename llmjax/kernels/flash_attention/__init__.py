"""Pallas flash attention, forward and backward, beside a plain-jnp reference.

    from llmjax.kernels import flash_attention
    out = flash_attention(q, k, v, causal=True, segment_ids=seg)   # q [B,T,H,D], k/v [B,S,G,D]
"""

from llmjax.kernels.flash_attention.ops import BlockSizes, flash_attention
