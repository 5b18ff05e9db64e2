"""Plain-jnp attention that the flash-attention kernel must match, outputs and gradients.

Layout as in jax.nn.dot_product_attention: q [B, T, H, K], k and v [B, S, G, K], H % G == 0;
query head h reads key/value head h // (H // G). Query i may attend key j (both absolute
indices from 0) iff every condition that is switched on holds:
  segments  segment_ids[b, i] == kv_segment_ids[b, j] != 0 (0 marks padding);
  causal    j <= i;
  window W  i - j < W if causal, else |i - j| < W.
A query with no key to attend outputs exactly 0 (and passes back zero gradients). An optional
T5 relative-position table [N, H] adds bias_table[bucket(j - i), h] to the logits. Logits and
softmax run in float32; the output has q's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.kernels.buckets import relative_position_bucket


def validate_inputs(q_BTHK, k_BSGK, v_BSGK, *, segment_ids=None, kv_segment_ids=None,
                    bias_table=None, bias_bidirectional=True, bias_max_distance=128,
                    window=None) -> None:
  """Raises ValueError naming the first input whose shape or value breaks the layout above."""
  for name, x in (("q", q_BTHK), ("k", k_BSGK), ("v", v_BSGK)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T, H, K] for q, [B, S, G, K] for k and "
                       f"v); got {name}.shape={x.shape}")
  if k_BSGK.shape != v_BSGK.shape:
    raise ValueError(f"k and v must have the same shape [B, S, G, K]; got k.shape={k_BSGK.shape}"
                     f" and v.shape={v_BSGK.shape}")
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  for what, axis in (("batch size", 0), ("head dim", 3)):
    if k_BSGK.shape[axis] != q_BTHK.shape[axis]:
      raise ValueError(f"q and k must have the same {what}; got q.shape={q_BTHK.shape} and "
                       f"k.shape={k_BSGK.shape}")
  if H % G:
    raise ValueError(f"the number of query heads H={H} must be a multiple of the number of "
                     f"key/value heads G={G}")
  if segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids was given without segment_ids; pass both (or "
                     "segment_ids alone for self-attention)")
  if segment_ids is not None:
    if segment_ids.shape != (B, T):
      raise ValueError(f"segment_ids must have shape [B, T]=({B}, {T}); got {segment_ids.shape}")
    if kv_segment_ids is None and S != T:
      raise ValueError(f"kv_segment_ids is required when the key length S={S} differs from the "
                       f"query length T={T}")
    if kv_segment_ids is not None and kv_segment_ids.shape != (B, S):
      raise ValueError(f"kv_segment_ids must have shape [B, S]=({B}, {S}); got "
                       f"{kv_segment_ids.shape}")
  if bias_table is not None and (bias_table.ndim != 2 or bias_table.shape[1] != H):
    raise ValueError(f"bias_table must have shape [num_buckets, H] with H={H}; got "
                     f"{bias_table.shape}")
  if bias_table is not None:
    # T5's buckets: half (of each direction's half) hold exact distances, the rest are
    # log-spaced up to max_distance, a spacing that needs max_distance > the exact ones.
    num_buckets = bias_table.shape[0]
    kind = "bidirectional" if bias_bidirectional else "causal"
    num_exact = (num_buckets // 2 if bias_bidirectional else num_buckets) // 2
    if num_exact < 1:
      raise ValueError(f"a {kind} bias_table needs at least {4 if bias_bidirectional else 2} "
                       f"buckets; got {num_buckets}")
    if bias_max_distance <= num_exact:
      raise ValueError(f"bias_max_distance={bias_max_distance} must exceed the {num_exact} "
                       f"exact buckets of a {kind} bias_table with {num_buckets} buckets")
  if window is not None and window < 1:
    raise ValueError(f"window must be >= 1 (or None for no window); got window={window}")


def make_mask(T: int, S: int, *, causal: bool = False, segment_ids=None, kv_segment_ids=None,
              window: int | None = None) -> jax.Array:
  """Boolean [B, T, S] ([1, T, S] without segment ids): may query i attend key j."""
  q_pos_T1 = jnp.arange(T)[:, None]
  k_pos_1S = jnp.arange(S)[None, :]
  mask_TS = jnp.ones((T, S), bool)
  if causal:
    mask_TS = mask_TS & (k_pos_1S <= q_pos_T1)
  if window is not None:
    distance_TS = q_pos_T1 - k_pos_1S
    mask_TS = mask_TS & ((distance_TS if causal else jnp.abs(distance_TS)) < window)
  if segment_ids is None:
    if kv_segment_ids is not None:
      raise ValueError("kv_segment_ids was given without segment_ids")
    return mask_TS[None]
  kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  q_seg_BT1 = segment_ids[:, :, None]
  same_segment_BTS = (q_seg_BT1 == kv_segment_ids[:, None, :]) & (q_seg_BT1 != 0)
  return mask_TS[None] & same_segment_BTS


def attention_reference(q_BTHK, k_BSGK, v_BSGK, *, causal: bool = False, segment_ids=None,
                        kv_segment_ids=None, bias_table=None, bias_bidirectional: bool = True,
                        bias_max_distance: int = 128, window: int | None = None,
                        scale: float | None = None) -> jax.Array:
  """Attention [B, T, H, K] with the masks and bias described in this module's docstring."""
  validate_inputs(q_BTHK, k_BSGK, v_BSGK, segment_ids=segment_ids,
                  kv_segment_ids=kv_segment_ids, bias_table=bias_table,
                  bias_bidirectional=bias_bidirectional, bias_max_distance=bias_max_distance,
                  window=window)
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  R = H // G  # query heads per key/value head
  scale = K ** -0.5 if scale is None else scale

  q_BTGRK = q_BTHK.reshape(B, T, G, R, K)
  logits_BGRTS = jnp.einsum("BTGRK,BSGK->BGRTS", q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * scale
  if bias_table is not None:  # bias_table[bucket(j - i), h] for query i and key j
    relative_TS = jnp.arange(S, dtype=jnp.int32)[None, :] - jnp.arange(T, dtype=jnp.int32)[:, None]
    bucket_TS = relative_position_bucket(relative_TS, bidirectional=bias_bidirectional,
                                         num_buckets=bias_table.shape[0],
                                         max_distance=bias_max_distance)
    bias_HTS = jnp.take(bias_table.astype(jnp.float32), bucket_TS, axis=0).transpose(2, 0, 1)
    logits_BGRTS = logits_BGRTS + bias_HTS.reshape(1, G, R, T, S)

  mask_BTS = make_mask(T, S, causal=causal, segment_ids=segment_ids,
                       kv_segment_ids=kv_segment_ids, window=window)
  mask_B11TS = mask_BTS[:, None, None]
  # The finite fill keeps a fully masked row free of NaNs (forward and backward); zeroing its
  # probabilities afterwards turns that row's output into exactly 0.
  logits_BGRTS = jnp.where(mask_B11TS, logits_BGRTS, jnp.finfo(jnp.float32).min)
  probs_BGRTS = jnp.where(mask_B11TS, jax.nn.softmax(logits_BGRTS, axis=-1), 0.0)

  out_BTGRK = jnp.einsum("BGRTS,BSGK->BTGRK", probs_BGRTS.astype(v_BSGK.dtype), v_BSGK,
                         preferred_element_type=jnp.float32)
  return out_BTGRK.reshape(B, T, H, K).astype(q_BTHK.dtype)
