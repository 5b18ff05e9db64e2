"""Pallas flash attention, forward and backward, beside a plain-jnp reference (ops.py)."""

from llmjax.kernels.flash_attention.ops import BlockSizes, flash_attention
