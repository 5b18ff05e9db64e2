"""What the TPU and GPU kernels share: static settings, block spans and T5 bucket math."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30  # masked logits: finite, so exp(NEG - NEG) stays defined for rows that saw nothing
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
div = jax.lax.div  # a // b for non-negative traced ints, without floor division's sign handling


def dot(a, b, dims=NN, exact: bool = True):
  """The product of two blocks in float32. float32 blocks multiply at full precision when
  `exact` (TPU: always, as Mosaic refuses bfloat16 at HIGHEST), else the default (GPU: TF32)."""
  p = jax.lax.Precision.HIGHEST if exact and a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, dims, precision=(p, p), preferred_element_type=jnp.float32)


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


def at_least(x, n: int = 1):
  """1 where integer x >= n, else 0: a comparison without a boolean or a select (Triton can
  neither stage booleans in shared memory nor lower a broadcast scalar select)."""
  return jnp.clip(x - n + 1, 0, 1)


def bucket_of(st: Static, rel):
  """T5's bucket of each distance key - query in `rel`: integer comparisons against the
  thresholds of kernels/buckets.py, with no transcendental and no select (see at_least)."""
  if st.bias_bidirectional:
    bucket, distance = st.num_buckets // 2 * at_least(rel, 1), jnp.abs(rel)
  else:
    bucket, distance = 0, jnp.maximum(-rel, 0)
  for threshold in st.bucket_thresholds:
    bucket = bucket + at_least(distance, threshold)
  return bucket


def blocks_visible(st: Static, q_first, k_first, bq: int, bk: int, whole: bool = False):
  """Whether the causal diagonal and window let some query of bq rows from q_first see some
  key of bk from k_first (scalars or arrays); `whole`: every query every key."""
  q_last, k_last = q_first + bq - 1, k_first + bk - 1
  if whole:  # the nearest pair for the window, the farthest for the diagonal
    q_first, q_last, k_first, k_last = q_last, q_first, k_last, k_first
  visible = True
  if st.causal:
    visible = visible & (k_first <= q_last)
  if st.window is not None:
    visible = visible & (q_first - k_last < st.window)
    if not st.causal:
      visible = visible & (k_first - q_last < st.window)
  return visible


def spans(st: Static, q_seg, kv_seg, bq: int, bk: int):
  """Per q block the kv blocks it may see, [first, end), and their first run of fast blocks,
  [fast, fast_end) (one segment, no padding, all visible, one T5 bucket: no mask or bias);
  then the same four per kv block over q blocks. Each [B * blocks] int32; empty: [0, 0), no
  fast run: [end, end). Non-contiguous segment ids may leave invisible blocks in a span, which
  the mask zeroes."""
  B = q_seg.shape[0]

  def per_block(seg, size):  # lowest and highest non-padding id; one segment and no padding
    blocks = seg.reshape(B, -1, size)
    lo = jnp.min(jnp.where(blocks != 0, blocks, jnp.iinfo(jnp.int32).max), axis=2)
    return lo, jnp.max(blocks, axis=2), jnp.all(blocks == lo[..., None], axis=2)
  (q_lo, q_hi, q_one), (kv_lo, kv_hi, kv_one) = per_block(q_seg, bq), per_block(kv_seg, bk)
  q_first = bq * jnp.arange(q_lo.shape[1])[None, :, None]
  k_first = bk * jnp.arange(kv_lo.shape[1])[None, None, :]
  meet = (q_lo[:, :, None] <= kv_hi[:, None, :]) & (kv_lo[:, None, :] <= q_hi[:, :, None])
  meet &= blocks_visible(st, q_first, k_first, bq, bk)
  fast = (q_one[:, :, None] & kv_one[:, None, :] & (q_lo[:, :, None] == kv_lo[:, None, :])
          & blocks_visible(st, q_first, k_first, bq, bk, whole=True))
  if st.num_buckets:  # the nearest and farthest distances in one bucket (monotonic)
    fast &= bucket_of(st, k_first - q_first + bk - 1) == bucket_of(st, k_first - q_first - bq + 1)

  def span(meet, fast):  # [B, n, m] -> the four along m
    m = meet.shape[-1]
    index = jnp.arange(m, dtype=jnp.int32)
    end = jnp.max(jnp.where(meet, index + 1, 0), axis=-1)
    first = jnp.where(end > 0, jnp.min(jnp.where(meet, index, m), axis=-1), 0)
    start = jnp.min(jnp.where(fast, index, m), axis=-1)
    stop = jnp.min(jnp.where((index > start[..., None]) & ~fast, index, m), axis=-1)
    start, stop = jnp.where(start < m, start, end), jnp.where(start < m, stop, end)
    return tuple(x.reshape(-1).astype(jnp.int32) for x in (first, end, start, stop))
  return (*span(meet, fast), *span(meet.transpose(0, 2, 1), fast.transpose(0, 2, 1)))
