"""Sampling from a decoder-only model with its KV cache, one token at a time."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from llmjax.models.gpt import GPT, GPTConfig


@jax.jit(static_argnums=(0, 1))
def _empty_cache(model: GPT, window: int):
  """A KV cache for `window` tokens; returning only it lets XLA drop the parameter initializers."""
  return model.init(jax.random.key(0), jnp.zeros((1, window), jnp.int32))["cache"]


@jax.jit(static_argnums=(0, 4))
def _feed(model: GPT, params, cache, token_11: jax.Array, temperature: float, key: jax.Array):
  """Appends one token to the KV cache; returns the token sampled to follow it, and the cache."""
  logits_11V, variables = model.apply({"params": params, "cache": cache}, token_11,
                                      mutable=["cache"])
  if temperature == 0:
    return jnp.argmax(logits_11V[:, -1], axis=-1), variables["cache"]
  return jax.random.categorical(key, logits_11V[:, -1] / temperature), variables["cache"]


def generate(cfg: GPTConfig, params, prompt: Sequence[int], num_tokens: int,
             temperature: float = 0.8, seed: int = 0) -> list[int]:
  """`num_tokens` ids continuing `prompt`, sampled one at a time with the KV cache.

  Temperature 0 is greedy. Tokens go in one at a time, the prompt too, so one compiled step
  serves all. The cache holds cfg.max_seq_len positions; when it is full it restarts with the
  last half of the text so far (refed), and generation goes on from there.
  """
  if not len(prompt):
    raise ValueError("generate: the prompt must hold at least one token")
  model, window = GPT(cfg, decode=True), cfg.max_seq_len
  empty_cache = _empty_cache(model, window)
  text, key = [int(t) for t in prompt], jax.random.key(seed)
  start = pos = max(0, len(text) - window)  # the cache holds text[start:pos]
  cache = empty_cache
  while len(text) < len(prompt) + num_tokens:
    if pos - start == window:
      start = pos = pos - window // 2
      cache = empty_cache
    next_1, cache = _feed(model, params, cache, jnp.array([[text[pos]]]), temperature,
                          jax.random.fold_in(key, pos))
    pos += 1
    if pos == len(text):  # the prompt is in: what the step sampled is the next token
      text.append(int(next_1[0]))
  return text[len(prompt):]
