"""Multi-head attention with grouped-query heads, packed-segment masks and a KV cache.

`Attention` projects; the score-softmax-mix step is a function chosen by name from
`ATTENTION_IMPLS`. Every implementation takes q [B,T,H,K], k and v [B,S,G,K] (H % G == 0),
query and key segment ids (0 = padding; a query sees only its own segment), `causal`, an
optional additive bias [1 or B, H, T, S] (or T5's `RelativeBias` table, which the kernel
applies blockwise), the logit `scale` and `q_offset`, the first query's index (decoding).
"""

import functools

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from llmjax import kernels
from llmjax import sharding as sh
from llmjax.layers import dot
from llmjax.layers.dropout import dropout
from llmjax.layers.positions import apply_rope
from llmjax.layers.relative_bias import RelativeBias


def attention_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array, *,
                   causal: bool, q_offset: jax.Array | int = 0,
                   prefix_mask: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, T, S]: the same non-padding segment (0 = padding: a padding query sees no
  key) and, if causal, key index <= query index. `prefix_mask`
  [B, T] (causal self-attention only) marks a prefix-LM's prefix: queries in it also see the
  later prefix keys of their segment, so the prefix is bidirectional."""
  mask_BTS = ((q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])
              & (q_segment_ids_BT != 0)[:, :, None])
  if causal:
    T, S = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    q_pos_T = jnp.arange(T) + q_offset
    visible_BTS = (jnp.arange(S)[None, :] <= q_pos_T[:, None])[None]
    if prefix_mask is not None:
      prefix_BT = prefix_mask.astype(bool)
      visible_BTS = visible_BTS | (prefix_BT[:, :, None] & prefix_BT[:, None, :])
    mask_BTS = mask_BTS & visible_BTS
  return mask_BTS[:, None]


def xla_attention(q_BTHK, k_BSGK, v_BSGK, *, q_segment_ids, kv_segment_ids, causal, bias=None,
                  scale, q_offset=0, dropout_rate=0.0, dropout_rng=None, prefix_mask=None):
  """Plain jnp attention: float32 logits and softmax; GQA without repeating K and V. A query
  with no key to attend (padding) outputs exactly 0 and passes back zero gradients, as the
  kernel and its reference (llmjax/kernels/flash_attention/reference.py)."""
  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  if isinstance(bias, RelativeBias):
    bias = bias.dense(T, k_BSGK.shape[1], q_offset)
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum("BTGRK,BSGK->BGRTS", q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits_BGRTS = logits_BGRTS + bias.astype(jnp.float32).reshape(
        bias.shape[0], G, H // G, *bias.shape[2:])
  mask_B11TS = attention_mask(q_segment_ids, kv_segment_ids, causal=causal,
                              q_offset=q_offset, prefix_mask=prefix_mask)[:, None]
  # A finite fill keeps a row with no key free of NaNs; its output is zeroed below.
  logits_BGRTS = jnp.where(mask_B11TS, logits_BGRTS, jnp.finfo(jnp.float32).min)
  probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    probs_BGRTS = dropout(probs_BGRTS, dropout_rate, dropout_rng)
  out_BTGRK = jnp.einsum("BGRTS,BSGK->BTGRK", probs_BGRTS.astype(v_BSGK.dtype), v_BSGK)
  has_key_BT = jnp.any(mask_B11TS, axis=(1, 2, 4))  # zeroing the output: cheaper than probs
  return jnp.where(has_key_BT[:, :, None, None], out_BTGRK.reshape(B, T, H, K), 0)


def pallas_attention(q_BTHK, k_BSGK, v_BSGK, *, q_segment_ids, kv_segment_ids, causal,
                     bias=None, scale, q_offset=0, dropout_rate=0.0, dropout_rng=None,
                     prefix_mask=None):
  """The Pallas flash-attention kernel (llmjax/kernels), run per shard under a mesh, T5's relative
  bias fused from its table; what the kernel cannot do (`why`) falls back to `xla_attention`."""
  why = ("attention dropout" if dropout_rate > 0.0 and dropout_rng is not None
         else "a dense bias" if bias is not None and not isinstance(bias, RelativeBias)
         else "a prefix mask" if prefix_mask is not None
         else "decoding" if not (isinstance(q_offset, int) and q_offset == 0)
         else f"head dim {q_BTHK.shape[-1]}" if q_BTHK.shape[-1] not in kernels.HEAD_DIMS
         else None)
  if why:
    _warn_once(f"attention_impl='pallas': {why} is not supported by the kernel; using XLA")
    return xla_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, causal=causal, bias=bias, scale=scale,
                         q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                         prefix_mask=prefix_mask)
  table_NH = None if bias is None else bias.table_NH
  settings = {} if bias is None else {"bias_bidirectional": bias.bidirectional,
                                      "bias_max_distance": bias.max_distance}

  def attend(q, k, v, q_seg, kv_seg, table):
    return kernels.flash_attention(q, k, v, causal=causal, segment_ids=q_seg,
                                   kv_segment_ids=kv_seg, bias_table=table, scale=scale, **settings)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attend(q_BTHK, k_BSGK, v_BSGK, q_segment_ids, kv_segment_ids, table_NH)
  # Batch and heads are independent: each device runs the kernel on its own shard. An axis
  # that does not divide B, or the heads of both q and kv alike (GQA: each shard must keep
  # whole groups), is left out: those shards then repeat the work, never change the answer.
  batch, heads = sh.fit_spec(P(*nn.logical_to_mesh_axes((sh.BATCH, sh.HEADS))),
                             (q_BTHK.shape[0], q_BTHK.shape[2]), mesh)
  kv_heads = sh.fit_spec(P(*nn.logical_to_mesh_axes((sh.KV_HEADS,))), (k_BSGK.shape[2],), mesh)
  if heads != kv_heads[0]:
    heads = None
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, heads, None)
  return jax.shard_map(attend, mesh=mesh, check_vma=False,
                       in_specs=(q_spec, kv_spec, kv_spec, P(batch, None), P(batch, None),
                                 None if table_NH is None else P(None, heads)),
                       out_specs=q_spec)(q_BTHK, k_BSGK, v_BSGK, q_segment_ids,
                                         kv_segment_ids, table_NH)


def auto_attention(q_BTHK, k_BSGK, v_BSGK, **kwargs):
  """The kernel on TPU and GPU for sequences of 128 or more, XLA otherwise."""
  fast = (jax.default_backend() in ("tpu", "gpu") and q_BTHK.shape[1] >= 128
          and q_BTHK.shape[-1] in kernels.HEAD_DIMS)
  return (pallas_attention if fast else xla_attention)(q_BTHK, k_BSGK, v_BSGK, **kwargs)


_warn_once = functools.cache(logging.warning)  # each fallback reason is logged once
# Attention implementations by name (the config's `attention_impl`).
ATTENTION_IMPLS = {"xla": xla_attention, "pallas": pallas_attention, "auto": auto_attention}


class Attention(nn.Module):
  """Self- or cross-attention: project, (rotate), attend, project back."""

  num_heads: int  # H, a multiple of num_kv_heads
  num_kv_heads: int  # G
  head_dim: int  # K
  use_bias: bool = True
  scale: float | None = None  # the logits' scale; None: 1/sqrt(K) (T5 uses 1.0)
  rope_theta: float | None = None  # if set, q and k are rotated at `positions`
  dropout_rate: float = 0.0
  deterministic: bool = True
  impl: str = "xla"  # a key of ATTENTION_IMPLS
  decode: bool = False  # keep keys and values in the "cache" collection; attend to all so far
  cross: bool = False  # attend to `kv_BSD`, which decoding projects once, then reads cached
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  q_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  kv_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  out_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

  def _proj(self, x, eq, shape, axes, init, name):
    kernel = self.param(f"{name}_kernel", nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    n = x.ndim - 2  # contracted: x's dims after [B, T] with the kernel's first n (`eq`)
    # dot_general (jax.lax.dot_general unless both are 16-bit), not jnp.einsum: qwix's LoRA
    # and quantization hook jax.lax.dot_general in linen modules.
    y = dot.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                    ((), ())))
    if self.use_bias:
      bias_shape = shape[x.ndim - 2:]  # the output dims: the kernel less the contracted ones
      bias = self.param(f"{name}_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, axes[-len(bias_shape):]), bias_shape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _update_cache(self, k_BSGK, v_BSGK, segment_ids_BT):
    """Writes this step's keys, values and segment ids at the cache index; returns the full
    cache, the first query's offset, the keys' segment ids and an overflow flag.

    The cache is as long as the input it was initialized with; keys keep the segment ids they
    were written with, so left padding and unwritten slots (id 0) are never attended. An
    overflowing step cannot raise inside jit: its outputs are NaN. Keys are stored heads-first,
    [B, G, S, K], the layout the matmuls read, so a step copies only its own keys."""
    is_initialized = self.has_variable("cache", "cached_key")
    B, T, G, K = k_BSGK.shape
    cached_k = self.variable("cache", "cached_key", jnp.zeros, (B, G, T, K), k_BSGK.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, (B, G, T, K), v_BSGK.dtype)
    cached_seg = self.variable("cache", "cached_segment_ids", jnp.zeros, segment_ids_BT.shape,
                               jnp.int32)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:  # init call: the cache takes the shape of the (max-length) input
      return k_BSGK, v_BSGK, 0, segment_ids_BT, False
    i = index.value
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, heads_first(k_BSGK), (0, 0, i, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, heads_first(v_BSGK), (0, 0, i, 0))
    cached_seg.value = jax.lax.dynamic_update_slice(
        cached_seg.value, segment_ids_BT.astype(jnp.int32), (0, i))
    index.value = i + T
    return (heads_first(cached_k.value), heads_first(cached_v.value), i, cached_seg.value,
            i + T > cached_k.value.shape[2])

  def _cross_cache(self, k_BSGK, v_BSGK, kv_segment_ids_BS):
    """Decoding cross-attention: the encoder's keys, values and segment ids are projected once,
    on the call that passes them, and read back from the cache on the calls that pass None."""
    if k_BSGK is None and not self.has_variable("cache", "cross_key"):
      raise ValueError("cross-attention got no keys and has none cached: pass the encoder "
                       "output on the first decoding call")
    new = (k_BSGK, v_BSGK, kv_segment_ids_BS)
    cached = [self.variable("cache", name, jnp.zeros, getattr(x, "shape", None), dtype)
              for name, x, dtype in zip(("cross_key", "cross_value", "cross_segment_ids"), new,
                                        (self.dtype, self.dtype, jnp.int32))]
    if k_BSGK is not None:
      for var, value in zip(cached, new):
        var.value = value.astype(var.value.dtype)
    return tuple(var.value for var in cached)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, kv_BSD: jax.Array | None = None, *,
               q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None,
               causal: bool = False, bias: jax.Array | None = None,
               positions: jax.Array | None = None,
               prefix_mask: jax.Array | None = None) -> jax.Array:
    """Attends queries from `x_BTD` to keys from `kv_BSD` (default: `x_BTD` itself);
    `prefix_mask` (causal self-attention) makes the marked prefix bidirectional (prefix LM)."""
    H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
    if H % G:
      raise ValueError(f"num_heads={H} is not divisible by num_kv_heads={G}")
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f"unknown attention impl {self.impl!r}; expected one of "
                       f"{sorted(ATTENTION_IMPLS)}")
    self_attention = kv_BSD is None and not self.cross
    if self.rope_theta is not None and not self_attention:
      raise ValueError("rotary embeddings (rope_theta) apply to self-attention only")
    if prefix_mask is not None and not (causal and self_attention and not self.decode):
      raise ValueError("prefix_mask applies to causal self-attention outside decoding only")
    if kv_BSD is None and not self_attention and not self.decode:
      raise ValueError("cross-attention needs kv_BSD (only decoding reads it from the cache)")
    kv_BSD = x_BTD if self_attention else kv_BSD
    kv_segment_ids = q_segment_ids if self_attention else kv_segment_ids
    D = x_BTD.shape[-1]
    q_BTHK = self._proj(x_BTD, "BTD,DHK->BTHK", (D, H, K), (sh.EMBED, sh.HEADS, sh.HEAD_DIM),
                        self.q_init, "query")
    k_BSGK = v_BSGK = None
    if kv_BSD is not None:
      if kv_segment_ids is None:
        kv_segment_ids = jnp.ones(kv_BSD.shape[:2], jnp.int32)
      kv_axes = (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM)
      k_BSGK = self._proj(kv_BSD, "BTD,DHK->BTHK", (D, G, K), kv_axes, self.kv_init, "key")
      v_BSGK = self._proj(kv_BSD, "BTD,DHK->BTHK", (D, G, K), kv_axes, self.kv_init, "value")
    if self.rope_theta is not None:
      if positions is None:
        raise ValueError("rotary attention needs positions")
      q_BTHK = apply_rope(q_BTHK, positions, self.rope_theta)
      k_BSGK = apply_rope(k_BSGK, positions, self.rope_theta)

    q_offset, overflow = 0, False
    if self.decode and self_attention:
      k_BSGK, v_BSGK, q_offset, kv_segment_ids, overflow = self._update_cache(
          k_BSGK, v_BSGK, q_segment_ids)
    elif self.decode:
      k_BSGK, v_BSGK, kv_segment_ids = self._cross_cache(k_BSGK, v_BSGK, kv_segment_ids)
    q_BTHK = sh.constrain(q_BTHK, (sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM))
    k_BSGK = sh.constrain(k_BSGK, (sh.BATCH, sh.LENGTH, sh.KV_HEADS, sh.HEAD_DIM))
    v_BSGK = sh.constrain(v_BSGK, (sh.BATCH, sh.LENGTH, sh.KV_HEADS, sh.HEAD_DIM))

    use_dropout = not self.deterministic and self.dropout_rate > 0.0
    out_BTHK = ATTENTION_IMPLS[self.impl](
        q_BTHK, k_BSGK, v_BSGK, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        causal=causal, bias=bias, scale=K ** -0.5 if self.scale is None else self.scale,
        q_offset=q_offset, dropout_rate=self.dropout_rate if use_dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        **({} if prefix_mask is None else {"prefix_mask": prefix_mask}))
    out_BTHK = jnp.where(overflow, jnp.nan, out_BTHK)
    out_BTHK = sh.constrain(out_BTHK, (sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM))
    return self._proj(out_BTHK, "BTHK,HKD->BTD", (H, K, D), (sh.HEADS, sh.HEAD_DIM, sh.EMBED),
                      self.out_init, "out")
