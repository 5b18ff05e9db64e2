"""Absolute positions (learned, sinusoidal), rotary embeddings, and positions of packed rows."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh
from llmjax.layers.embedding import lookup


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Position of each token within its packed segment: 0, 1, ... restarting at every new id."""
  T = segment_ids_BT.shape[-1]
  idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BT.shape)
  starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[..., :1], dtype=bool),
                               segment_ids_BT[..., 1:] != segment_ids_BT[..., :-1]], axis=-1)
  start_idx_BT = jax.lax.cummax(jnp.where(starts_BT, idx_BT, 0), axis=segment_ids_BT.ndim - 1)
  return idx_BT - start_idx_BT


class LearnedPositions(nn.Module):
  """A learned [max_length, D] table indexed by position (GPT-2, BERT)."""

  max_length: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    table = self.param("embedding",
                       nn.with_logical_partitioning(self.embedding_init, (sh.POSITIONS, sh.EMBED)),
                       (self.max_length, self.features), self.param_dtype)
    return lookup(table, positions_BT, (sh.POSITIONS, sh.EMBED)).astype(self.dtype)


def sinusoidal(positions_BT: jax.Array, features: int, max_timescale: float = 10_000.0) -> jax.Array:
  """Transformer sinusoids: [sin(p w_0..), cos(p w_0..)] with geometric frequencies, float32."""
  if features % 2:
    raise ValueError(f"sinusoidal positions need an even feature count, got {features}")
  freqs = max_timescale ** (-jnp.arange(features // 2, dtype=jnp.float32) / (features // 2))
  angle_BTF = positions_BT[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angle_BTF), jnp.cos(angle_BTF)], axis=-1)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotary position embedding in the rotate-half layout (GPT-NeoX, Llama), computed in float32."""
  K = x_BTHK.shape[-1]
  if K % 2:
    raise ValueError(f"rotary embeddings need an even head dim, got {K}")
  inv_freq = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angle_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin_BT1k, cos_BT1k = jnp.sin(angle_BTk)[:, :, None], jnp.cos(angle_BTk)[:, :, None]
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1k - x2 * sin_BT1k, x2 * cos_BT1k + x1 * sin_BT1k], axis=-1)
  return out.astype(x_BTHK.dtype)
