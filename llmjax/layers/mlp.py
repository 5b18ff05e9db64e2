"""Position-wise feed-forward block: plain (gelu, relu) or gated (GeGLU, SwiGLU)."""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh
from llmjax.layers.dot import dot_general
from llmjax.layers.dropout import Dropout

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf form (BERT)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's gelu_new, T5 v1.1
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
  """The activation function called `name`; a ValueError lists the known ones."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def dense(features: int, axes: tuple[str, str], init: nn.initializers.Initializer,
          use_bias: bool = True, **kw) -> nn.Dense:
  """nn.Dense whose kernel and bias carry logical axis names (kernel: `axes`, bias: `axes[1]`)."""
  return nn.Dense(features, use_bias=use_bias, dot_general=dot_general,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), **kw)


class Mlp(nn.Module):
  """wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x) (GeGLU with gelu, SwiGLU with silu)."""

  d_ff: int
  activation: str = "gelu"
  gated: bool = False
  use_bias: bool = True
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  wi_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  wo_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    act = activation(self.activation)
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    wi = lambda name: dense(self.d_ff, (sh.EMBED, sh.MLP), self.wi_init, name=name, **kw)(x_BTD)
    h_BTF = act(wi("wi_0")) * wi("wi_1") if self.gated else act(wi("wi"))
    h_BTF = sh.constrain(h_BTF, (sh.BATCH, sh.LENGTH, sh.MLP))
    h_BTF = Dropout(self.dropout_rate)(h_BTF, deterministic=self.deterministic)
    return dense(x_BTD.shape[-1], (sh.MLP, sh.EMBED), self.wo_init, name="wo", **kw)(h_BTF)
