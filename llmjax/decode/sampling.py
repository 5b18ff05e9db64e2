"""Choosing the next token: greedy, or sampling with transformers' temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen from the logits; hashable, so a compiled loop keys on it.

  temperature 0 is greedy (argmax, lowest id among ties). Otherwise the logits are divided by
  the temperature, filtered by top-k, then top-p (transformers' logits warpers, in that order),
  and a token drawn. top_k None or 0 and top_p None or 1.0 filter nothing."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature}; expected >= 0 (0 is greedy)")
    if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
      raise ValueError(f"top_k={self.top_k}; expected a whole number >= 0 (0 or None: off)")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}; expected a probability in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def filter(self, logits_BV: jax.Array) -> jax.Array:
    """Float32 logits with the filtered-out tokens at -inf (the distribution tokens come from)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if self.temperature not in (0, 1):
      logits_BV = logits_BV / self.temperature
    if self.top_k:
      k = min(int(self.top_k), logits_BV.shape[-1])
      kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
      logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)  # ties with the k-th stay
    if self.top_p is not None and self.top_p < 1:
      logits_BV = top_p_filter(logits_BV, self.top_p)
    return logits_BV

  def choose(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
    """The next token of each row, int32 [B]."""
    if self.greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, self.filter(logits_BV), axis=-1).astype(jnp.int32)


def top_p_filter(logits_BV: jax.Array, top_p: float) -> jax.Array:
  """Keeps the fewest likeliest tokens whose probability reaches `top_p` (never none):
  transformers' rule, dropping in ascending order every token of cumulative probability
  <= 1 - top_p. Ties go by id (a stable sort; torch's CPU sort is stable only to 16 entries)."""
  order_BV = jnp.argsort(logits_BV, axis=-1, stable=True)
  sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
  cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
  drop_sorted_BV = (cumulative_BV <= 1 - top_p).at[:, -1].set(False)
  drop_BV = jnp.zeros_like(drop_sorted_BV).at[
      jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(drop_sorted_BV)
  return jnp.where(drop_BV, -jnp.inf, logits_BV)
