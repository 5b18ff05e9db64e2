"""What the TPU and GPU kernels share: their static settings and the per-block bias math."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30  # masked logits: finite, so exp(NEG - NEG) stays defined for rows that saw nothing
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot(a, b, dims=NN, exact: bool = True):
  """The product of two blocks in float32. bfloat16 products are exact. float32 blocks
  multiply at full precision when `exact` (not one bfloat16 pass, not TF32: TPU kernels
  always, whatever jax_default_matmul_precision says, as Mosaic refuses bfloat16 operands at
  HIGHEST), else at the platform's default (TF32 on GPU, as XLA's own float32 matmuls)."""
  p = jax.lax.Precision.HIGHEST if exact and a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, dims, precision=(p, p), preferred_element_type=jnp.float32)


def div(a, b: int):
  """a // b for non-negative traced ints, lowered without floor division's sign handling."""
  return jax.lax.div(a, b)


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything a kernel is specialized on (hashable: a custom_vjp static argument)."""
  causal: bool
  window: int | None
  scale: float
  num_buckets: int  # 0: no relative bias
  bias_bidirectional: bool
  block_q: int
  block_kv: int
  block_q_dq: int
  block_kv_dq: int
  block_q_dkv: int
  block_kv_dkv: int
  interpret: bool
  bucket_thresholds: tuple[int, ...] = ()  # kernels/buckets.py: distance_thresholds
  backend: str = "tpu"  # which module's kernels: tpu.py or gpu.py
  target: str | None = None  # kernels/targets.py: NAMES


def buckets(st: Static, qi, kj, bq: int, bk: int):
  """T5's bucket of (key - query) for each [bq, bk] position of block (qi, kj)."""
  row = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  col = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return bucket_of(st, col - row)


def bucket_of(st: Static, rel):
  """T5's bucket of each distance key - query in `rel`: integer comparisons against the
  per-direction thresholds (kernels/buckets.py), no transcendental in the kernel."""
  if st.bias_bidirectional:
    bucket = jnp.where(rel > 0, st.num_buckets // 2, 0)
    distance = jnp.maximum(rel, -rel)
  else:
    bucket = jnp.zeros_like(rel)
    distance = jnp.maximum(-rel, 0)
  for threshold in st.bucket_thresholds:
    bucket = bucket + (distance >= threshold).astype(jnp.int32)
  return bucket


def bias(st: Static, table_ref, h, buckets):
  """The [bq, bk] bias of head h: table[h, bucket], as selects over the few buckets."""
  bias = jnp.zeros(buckets.shape, jnp.float32)
  for n in range(st.num_buckets):
    bias = jnp.where(buckets == n, table_ref[h, n], bias)
  return bias


def block_ranges(q_seg, kv_seg, bq: int, bk: int):
  """Per-block [lo, hi] of the non-padding segment ids (flattened [B * blocks] int32);
  an all-padding block gets an empty range, so no block pair involving it is visible."""
  def per_block(seg, size):
    B, N = seg.shape
    blocks = seg.reshape(B, N // size, size)
    real = blocks != 0
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(real, blocks, big), axis=2)
    hi = jnp.max(jnp.where(real, blocks, -1), axis=2)
    return lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32)
  return (*per_block(q_seg, bq), *per_block(kv_seg, bk))


def blocks_visible(st: Static, q_first, k_first, bq: int, bk: int):
  """Whether the causal diagonal and the window let some query of the bq rows from q_first
  see some key of the bk from k_first (scalars or broadcasting arrays)."""
  q_last, k_last = q_first + bq - 1, k_first + bk - 1
  visible = True
  if st.causal:
    visible = visible & (k_first <= q_last)
  if st.window is not None:
    visible = visible & (q_first - k_last < st.window)
    if not st.causal:
      visible = visible & (k_first - q_last < st.window)
  return visible


def position_mask(st: Static, qi, kj, bq: int, bk: int):
  """Boolean [bq, bk] of the causal and window conditions for block (qi, kj); None if off."""
  if not (st.causal or st.window is not None):
    return None
  row = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  col = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = col <= row if st.causal else None
  if st.window is not None:
    near = (row - col if st.causal else jnp.maximum(row - col, col - row)) < st.window
    mask = near if mask is None else mask & near
  return mask
