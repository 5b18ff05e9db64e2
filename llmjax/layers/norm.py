"""LayerNorm and RMSNorm, normalizing in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh


def _affine(norm: nn.Module, y: jax.Array, use_bias: bool) -> jax.Array:
  """y * scale (+ bias) in float32, cast to the norm's dtype; parameters [D] on "embed"."""
  param = lambda name, init: norm.param(name, nn.with_logical_partitioning(init, (sh.EMBED,)),
                                        (y.shape[-1],), norm.param_dtype).astype(jnp.float32)
  y = y * param("scale", nn.initializers.ones)
  if use_bias:
    y = y + param("bias", nn.initializers.zeros)
  return y.astype(norm.dtype)


class LayerNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

  epsilon: float = 1e-5
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return _affine(self, (x32 - mean) * jax.lax.rsqrt(var + self.epsilon), self.use_bias)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale (T5's norm: no mean subtraction, no bias)."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
    return _affine(self, y, use_bias=False)
