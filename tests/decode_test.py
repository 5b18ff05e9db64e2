"""KV-cache generation from a briefly trained tiny GPT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import decode
from llmjax.models.gpt import GPT, GPTConfig

# One layer keeps the compilations (most of these tests' time) short.
CFG = GPTConfig.from_size("tiny", num_layers=1, max_seq_len=32, dropout_rate=0.0)
TEXT = b"the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def trained():
  """Params after 150 Adam steps on random windows of TEXT: enough to learn the sentence."""
  model, data = GPT(CFG), np.frombuffer(TEXT, np.uint8).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, windows_BT1):
    def loss_fn(p):
      logits = model.apply({"params": p}, windows_BT1[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, windows_BT1[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng, opt_state = np.random.default_rng(0), tx.init(params)
  for _ in range(150):
    starts = rng.integers(0, len(data) - 33, 8)
    params, opt_state, loss = step(params, opt_state, data[starts[:, None] + np.arange(33)])
  assert float(loss) < 1.0
  return params


def generate(params, prompt: bytes, n: int, **kw) -> bytes:
  return bytes(decode.generate(CFG, params, list(prompt), n, **kw))


def test_generate_length_and_determinism(trained):
  params = trained
  a = generate(params, b"the ", 45, temperature=0.8, seed=1)  # passes the window of 32
  assert len(a) == 45
  assert a == generate(params, b"the ", 45, temperature=0.8, seed=1)


def test_greedy_cache_matches_full_forward(trained):
  """Greedy with the KV cache == argmax of a full forward pass over the text so far.

  The reference sees the same context as the cache: when the text outgrows the window it
  restarts from the last window // 2 bytes. Each forward pass runs on the context padded to the
  window on the right, which a causal model ignores, so one compilation serves every length.
  """
  params = trained
  prompt, num_bytes, window = b"Xq", 60, CFG.max_seq_len  # an unseen start: a less trivial path
  logits_fn = jax.jit(lambda tokens_1T: GPT(CFG).apply({"params": params}, tokens_1T))
  text, start = list(prompt), 0
  while len(text) < len(prompt) + num_bytes:
    if len(text) - start > window:
      start = len(text) - 1 - window // 2
    context = text[start:]
    logits_1TV = logits_fn(jnp.array([context + [0] * (window - len(context))]))
    text.append(int(jnp.argmax(logits_1TV[0, len(context) - 1])))
  expected = bytes(text[len(prompt):])
  assert generate(params, prompt, num_bytes, temperature=0.0) == expected


def test_greedy_continues_the_sentence_past_the_window(trained):
  """The sentence (45 bytes) is longer than the window (32): the cache restarts coherently."""
  params = trained
  sentence = b"quick brown fox jumps over the lazy dog. the "
  assert generate(params, b"the ", 90, temperature=0.0) == sentence * 2
