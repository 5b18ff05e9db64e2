"""Transformer building blocks, one per file.

Dimension letters used in tensor names throughout llmjax: B batch, T query length,
S key length, D model width, H query heads, G key/value heads, K head width,
F feed-forward width, V vocabulary, L layers, N relative-position buckets.
"""

from llmjax.layers.dropout import Dropout
from llmjax.layers.attention import Attention, attention_mask, xla_attention, ATTENTION_IMPLS
from llmjax.layers.embedding import Embed
from llmjax.layers.mlp import Mlp, ACTIVATIONS
from llmjax.layers.norm import LayerNorm, RMSNorm
from llmjax.layers.positions import LearnedPositions, sinusoidal, apply_rope, segment_positions
from llmjax.layers.relative_bias import (RelativeBias, RelativePositionBias,
                                         relative_position_bucket)
