"""T5's relative position bias: log-spaced buckets of key-minus-query distance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh
from llmjax.kernels.buckets import relative_position_bucket


class RelativePositionBias(nn.Module):
  """A learned [N, H] table turned into an additive [1, H, T, S] attention bias."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, query_length: int, key_length: int, query_offset: jax.Array | int = 0
               ) -> jax.Array:
    """Bias for queries at positions offset+[0, T) against keys at [0, S), in float32."""
    table_NH = self.param("embedding",
                          nn.with_logical_partitioning(self.embedding_init, (sh.BUCKETS, sh.HEADS)),
                          (self.num_buckets, self.num_heads), self.param_dtype)
    q_pos_T = jnp.arange(query_length, dtype=jnp.int32) + query_offset
    k_pos_S = jnp.arange(key_length, dtype=jnp.int32)
    bucket_TS = relative_position_bucket(k_pos_S[None, :] - q_pos_T[:, None],
                                         bidirectional=self.bidirectional,
                                         num_buckets=self.num_buckets,
                                         max_distance=self.max_distance)
    bias_TSH = jnp.take(table_NH.astype(jnp.float32), bucket_TS, axis=0)
    return jnp.transpose(bias_TSH, (2, 0, 1))[None]
