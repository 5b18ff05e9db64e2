"""Token embedding that can also un-embed (a tied output head)."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import sharding as sh


def lookup(table_ND: jax.Array, ids_BT: jax.Array, axes: tuple[str, str]) -> jax.Array:
  """Rows of a table named `axes`, gathered with the table split over its rows only: XLA's
  partitioner cannot gather from a table also split on D into activations split over batch
  without replicating the whole table first."""
  table_ND = sh.constrain(table_ND, (axes[0], None))
  return sh.constrain(jnp.take(table_ND, ids_BT, axis=0), (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))


class Embed(nn.Module):
  """A [V, D] table: `__call__` looks tokens up, `attend` projects back onto the vocabulary."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  axes: tuple[str, str] = (sh.VOCAB, sh.EMBED)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids_BT: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids_BT.dtype, jnp.integer):
      raise ValueError(f"Embed expects integer token ids, got dtype {ids_BT.dtype}")
    return lookup(self.embedding, ids_BT, self.axes).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    """Logits over the table's rows, computed and returned in float32."""
    return jnp.einsum("BTD,VD->BTV", x_BTD.astype(jnp.float32),
                      jnp.asarray(self.embedding, jnp.float32))
