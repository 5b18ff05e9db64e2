"""Sequence-classification heads: a pooled vector per row -> logits [B, num_labels] (float32).

BERT pools with its pooler (tanh dense of the [CLS] hidden state) and applies dropout before
the head, as transformers' BertForSequenceClassification; GPT reads the last non-padding
token's final hidden state into a bias-free head, as GPT2ForSequenceClassification. One label
is regression (the trainer's classification objective uses MSE). Packed rows hold several
examples: the model's `pool_positions` [B, P] then name each one's pooled position ([CLS] or
last token) and the logits are [B, P, num_labels].
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh
from llmjax.layers.dropout import Dropout


def pick(x_BTD: jax.Array, positions_BP: jax.Array) -> jax.Array:
  """[B, P, D]: the hidden states at `positions_BP` (packed rows: one per example)."""
  return jnp.take_along_axis(x_BTD, positions_BP[..., None], axis=1)


def last_token(x_BTD: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
  """[B, D]: each row's hidden state at its last non-padding position (segment id > 0)."""
  last_B = x_BTD.shape[1] - 1 - jnp.argmax(segment_ids_BT[:, ::-1] > 0, axis=1)
  return pick(x_BTD, last_B[:, None])[:, 0]


class ClassifierHead(nn.Module):
  """dropout, then a dense layer to `num_labels` outputs: params {kernel [D, num_labels], bias}."""

  num_labels: int
  use_bias: bool = True
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BD: jax.Array, deterministic: bool = True) -> jax.Array:
    """Logits [..., num_labels] of pooled vectors [..., D] ([B, D], or [B, P, D] packed)."""
    x_BD = Dropout(self.dropout_rate)(x_BD, deterministic=deterministic)
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (sh.EMBED, None)), (x_BD.shape[-1], self.num_labels),
                        self.param_dtype)
    x_BD, kernel = nn.dtypes.promote_dtype(x_BD, kernel, dtype=self.dtype)
    logits_BC = jax.lax.dot_general(x_BD, kernel, (((x_BD.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      logits_BC = logits_BC + self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (None,)), (self.num_labels,), self.param_dtype).astype(self.dtype)
    return sh.constrain(logits_BC.astype(jnp.float32), (sh.BATCH,) + (None,) * (x_BD.ndim - 1))
