"""What the three model families share: config checks, dtypes, remat policies, layer stacks."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh
from llmjax.layers.mlp import ACTIVATIONS

# Named rematerialization policies for `remat_policy`: what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls
    "minimal": jax.checkpoint_policies.everything_saveable,  # remat boundary, save all
}


def check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class BaseConfig:
  """Fields and derived values every family config has; the families subclass it."""

  dropout_rate: float = 0.1
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = False  # nn.scan over layers (parameters get a leading layers axis)
  remat_policy: str = "none"  # a key of REMAT_POLICIES
  attention_impl: str = "xla"  # a key of llmjax.layers.ATTENTION_IMPLS
  SIZES: ClassVar[dict[str, dict[str, Any]]] = {}  # named sizes for from_size

  def __post_init__(self):
    """Checks the fields every family has; the families check their own after."""
    name = type(self).__name__
    for field in ("vocab_size", "d_model", "num_layers", "num_heads"):
      value = getattr(self, field)
      check(value > 0, f"{name}.{field} must be positive, got {value}")
    check(self.d_ff >= 0, f"{name}.d_ff must be positive (or 0 for 4 * d_model), got {self.d_ff}")
    check(self.head_dim is None or self.head_dim > 0, f"{name}.head_dim must be positive "
          f"(or None for d_model // num_heads), got {self.head_dim}")
    check(self.head_dim is not None or self.d_model % self.num_heads == 0,
          f"{name}.d_model={self.d_model} is not divisible by num_heads={self.num_heads} "
          f"(or give head_dim explicitly)")
    check(self.kv_heads > 0 and self.num_heads % self.kv_heads == 0,
          f"{name}.num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}")
    check(self.remat_policy in REMAT_POLICIES,
          f"{name}.remat_policy={self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    check(0.0 <= self.dropout_rate < 1.0, f"{name}.dropout_rate={self.dropout_rate} not in [0, 1)")
    for field in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        raise ValueError(f"{name}.{field}={getattr(self, field)!r} is not a dtype name") from None
    check(self.activation in ACTIVATIONS,
          f"{name}.activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")

  @classmethod
  def from_size(cls, size: str, **overrides):
    """The named size from the family's SIZES, with field overrides."""
    check(size in cls.SIZES,
          f"unknown {cls.__name__} size {size!r}; expected one of {sorted(cls.SIZES)}")
    return cls(**{**cls.SIZES[size], **overrides})

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def k(self) -> int:
    """Head width K."""
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def mlp_dim(self) -> int:
    """Feed-forward width F: d_ff, or 4 * d_model where d_ff is 0."""
    return self.d_ff or 4 * self.d_model

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def dtypes(self) -> dict[str, jnp.dtype]:
    """The `dtype` and `param_dtype` keyword arguments of layers."""
    return dict(dtype=self.compute_dtype, param_dtype=self.weight_dtype)

  def replace(self, **changes):
    """A copy with `changes` applied (and validated)."""
    return dataclasses.replace(self, **changes)


def check_classifier(cfg) -> None:
  """head="classify" needs num_labels >= 1 (and BERT its pooler); other heads take none."""
  name = type(cfg).__name__
  if cfg.head == "classify":
    check(cfg.num_labels >= 1, f"{name}.num_labels={cfg.num_labels}: head='classify' needs at "
          f"least 1 label (1: regression)")
    check(getattr(cfg, "pooler", True), f"{name}: head='classify' classifies the pooled [CLS] "
          f"state; set pooler=True")
  else:
    check(cfg.num_labels == 0, f"{name}.num_labels={cfg.num_labels} needs head='classify' "
          f"(head={cfg.head!r})")


def check_inputs(name: str, tokens_BT: jax.Array, **others: jax.Array | None) -> None:
  """Shape checks on model inputs, raised before any tracing work."""
  check(getattr(tokens_BT, "ndim", None) == 2,
        f"{name} expects int tokens of shape [batch, length], got shape {jnp.shape(tokens_BT)}")
  for key, value in others.items():
    if value is not None:
      check(jnp.shape(value) == jnp.shape(tokens_BT),
            f"{name}: {key} has shape {jnp.shape(value)} but tokens have {jnp.shape(tokens_BT)}")


@jax.custom_vjp
def _gradient_stored(x):
  """The identity, whose gradient is stored, not recomputed where used. XLA:CPU fuses the
  residual stream's gradient (a sum over every later layer) into each use, one layer's
  recomputing all later ones': quadratic in depth. optimization_barrier is dropped before
  fusion on CPU; a conditional is not (its taken branch is the identity)."""
  return x


_gradient_stored.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.cond(
    jnp.isnan(g[(0,) * g.ndim]), lambda g: g * 1.0, lambda g: g, g),))


def run_layers(block_cls: type[nn.Module], cfg, num_layers: int, x_BTD, *args,
               name: str = "layers", **block_kw):
  """Applies `num_layers` blocks, each block(x, *args) -> (x, None), under the config's remat
  policy: modules layers_0, layers_1, ... or, with `cfg.scan_layers`, one `nn.scan` module
  whose parameters get a leading "layers" axis."""
  if cfg.remat_policy != "none":
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    for i in range(num_layers):
      x_BTD = _gradient_stored(x_BTD) if jax.default_backend() == "cpu" else x_BTD
      x_BTD, _ = block_cls(cfg, name=f"{name}_{i}", **block_kw)(x_BTD, *args)
    return x_BTD
  stack = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                  split_rngs={"params": True, "dropout": True},
                  in_axes=(nn.broadcast,) * len(args), length=num_layers,
                  metadata_params={nn.PARTITION_NAME: sh.LAYERS})
  x_BTD, _ = stack(cfg, name=name, **block_kw)(x_BTD, *args)
  return x_BTD


def stack_layers(params: dict, num_layers: int, name: str = "layers") -> dict:
  """Unrolled params (`name_0`, `name_1`, ...) -> scanned params (`name` with a leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith(f"{name}_")}
  out[name] = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params[f"{name}_{i}"] for i in range(num_layers)])
  return out


def unstack_layers(params: dict, num_layers: int, name: str = "layers") -> dict:
  """Scanned params -> unrolled params; the inverse of `stack_layers`."""
  unrolled = {f"{name}_{i}": jax.tree.map(lambda x: x[i], params[name]) for i in range(num_layers)}
  return {k: v for k, v in params.items() if k != name} | unrolled
