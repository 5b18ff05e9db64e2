"""T5's relative position buckets, shared by the attention layers and the flash kernel.

Buckets come from integer comparisons against thresholds computed once on the host, never a
log on the device, so the XLA path and the kernels agree on every platform, even where T5's
distances 16, 32 and 64 land exactly on bucket edges (a one-ulp `log` error would flip them)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def distance_thresholds(*, bidirectional: bool, num_buckets: int,
                        max_distance: int) -> tuple[int, ...]:
  """For one direction, the smallest distance of each bucket after the first (a distance's
  bucket is the number it reaches): half the buckets hold exact small distances, the rest
  grow logarithmically up to `max_distance`, in float32 as T5 and Hugging Face compute it."""
  n = num_buckets // 2 if bidirectional else num_buckets
  max_exact = n // 2
  distance = np.arange(2 * max_distance + n, dtype=np.int64)
  log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
               / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact))
  large = np.minimum(max_exact + log_ratio.astype(np.int64), n - 1)
  bucket = np.where(distance < max_exact, distance, large)
  return tuple(int(np.argmax(bucket >= b)) for b in range(1, int(bucket.max()) + 1))


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """Bucket of `key_pos - query_pos`, exactly as T5 (and Hugging Face's port) computes it:
  bidirectional, half the buckets for keys after the query; causal, later keys in bucket 0."""
  if bidirectional:
    bucket = jnp.where(relative_position > 0, num_buckets // 2, 0)
    distance = jnp.abs(relative_position)
  else:
    bucket = jnp.zeros_like(relative_position)
    distance = -jnp.minimum(relative_position, 0)
  for threshold in distance_thresholds(bidirectional=bidirectional, num_buckets=num_buckets,
                                       max_distance=max_distance):
    bucket = bucket + (distance >= threshold).astype(bucket.dtype)
  return bucket.astype(relative_position.dtype)
