"""`decode.sample_text` (the main job's sample) on a briefly trained tiny byte GPT."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import decode
from llmjax.data import ByteTokenizer
from llmjax.models.gpt import GPT, GPTConfig
from tests import tiny_lm

TOK = ByteTokenizer(0)
# One layer keeps the compilations (most of these tests' time) short.
CFG = GPTConfig.from_size("tiny", vocab_size=TOK.vocab_size, num_layers=1, max_seq_len=32,
                          dropout_rate=0.0)
SENTENCE = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def setup():
  """(model, params, tokenizer) after 150 Adam steps on random windows: it learns the sentence."""
  model, data = GPT(CFG), TOK.encode(SENTENCE * 60).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
  params, loss = tiny_lm.fit(model, params, data, steps=150, length=32, batch=8)
  assert loss < 1.0
  # Trained on windows without BOS: a tokenizer without one, so prompts look like the data.
  tokenizer = types.SimpleNamespace(encode=TOK.encode, decode=TOK.decode, bos_id=None,
                                    eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  return model, params, tokenizer


def test_sample_continues_the_sentence_past_the_window(setup):
  """90 bytes from a window of 32: the sample goes on in rounds, coherently."""
  text = decode.sample_text(*setup, "the ", 90, temperature=0.0)
  assert text == "the " + (SENTENCE[4:] + SENTENCE[:4]) * 2


def test_sample_is_reproducible_from_its_seed(setup):
  a = decode.sample_text(*setup, "the ", 45, seed=1)
  assert len(a) == 4 + 45 and a == decode.sample_text(*setup, "the ", 45, seed=1)
  assert a != decode.sample_text(*setup, "the ", 45, seed=2)
