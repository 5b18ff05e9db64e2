"""T5's relative position buckets, shared by the attention layers and the flash kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """Bucket of `key_pos - query_pos`, exactly as T5 (and its Hugging Face port) computes it.

  Half the buckets hold exact small distances, the rest grow logarithmically up to
  `max_distance`. Bidirectional: separate halves for keys before and after the query.
  Causal: only keys at or before the query get distinct buckets.
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + log_ratio.astype(distance.dtype), num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)
