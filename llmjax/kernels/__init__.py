"""Hand-written kernels, each beside a plain-jnp reference: flash attention (Pallas)."""

from llmjax.kernels.flash_attention import BlockSizes, flash_attention
from llmjax.kernels.flash_attention.ops import HEAD_DIMS
