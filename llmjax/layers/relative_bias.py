"""T5's relative position bias: log-spaced buckets of key-minus-query distance."""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from llmjax import sharding as sh
from llmjax.kernels.buckets import relative_position_bucket


@struct.dataclass
class RelativeBias:
  """T5's bias in table form: [N, H] and its bucketing, for kernels that apply it blockwise
  (the flash kernel); `dense` builds the [1, H, T, S] bias for plain attention."""
  table_NH: jax.Array
  bidirectional: bool = struct.field(pytree_node=False)
  max_distance: int = struct.field(pytree_node=False)

  def dense(self, query_length: int, key_length: int, query_offset: jax.Array | int = 0):
    q_pos_T = jnp.arange(query_length, dtype=jnp.int32) + query_offset
    k_pos_S = jnp.arange(key_length, dtype=jnp.int32)
    bucket_TS = relative_position_bucket(
        k_pos_S[None, :] - q_pos_T[:, None], bidirectional=self.bidirectional,
        num_buckets=self.table_NH.shape[0], max_distance=self.max_distance)
    bias_TSH = jnp.take(self.table_NH.astype(jnp.float32), bucket_TS, axis=0)
    return jnp.transpose(bias_TSH, (2, 0, 1))[None]


class RelativePositionBias(nn.Module):
  """A learned [N, H] table turned into an additive [1, H, T, S] attention bias."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, query_length: int, key_length: int, query_offset: jax.Array | int = 0, *,
               as_table: bool = False):
    """Bias for queries at positions offset+[0, T) against keys at [0, S), in float32
    [1, H, T, S]; or, with `as_table`, the `RelativeBias` that attention applies itself."""
    table_NH = self.param("embedding",
                          nn.with_logical_partitioning(self.embedding_init, (sh.BUCKETS, sh.HEADS)),
                          (self.num_buckets, self.num_heads), self.param_dtype)
    bias = RelativeBias(table_NH, self.bidirectional, self.max_distance)
    return bias if as_table else bias.dense(query_length, key_length, query_offset)
