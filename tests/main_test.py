"""The demo's pieces: built-in corpus, a short training run, and KV-cache generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import main
from llmjax.models.gpt import GPT, GPTConfig

# One layer keeps the compilations (most of these tests' time) short.
CFG = GPTConfig.from_size("tiny", num_layers=1, max_seq_len=32, dropout_rate=0.0)
TEXT = b"the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def trained():
  """(params, history) after 100 steps on TEXT: enough to learn the sentence, ~1 s once compiled."""
  return main.train(CFG, TEXT, batch_size=8, seq_len=32, steps=100, learning_rate=3e-3,
                    log_every=25, eval_every=50, log=lambda line: None)


def test_builtin_corpus_is_large():
  assert len(main.builtin_corpus()) > 100_000


def test_train_lowers_loss(trained):
  _, history = trained
  assert [h["step"] for h in history] == [0, 25, 50, 75, 100]
  assert history[-1]["val_loss"] < 1.0 < 5.0 < history[0]["val_loss"], history
  assert history[-1]["train_loss"] < 1.0, history


def test_generate_length_and_determinism(trained):
  params, _ = trained
  a = main.generate(CFG, params, b"the ", 45, temperature=0.8, seed=1)  # passes the window of 32
  assert len(a) == 45
  assert a == main.generate(CFG, params, b"the ", 45, temperature=0.8, seed=1)


def test_greedy_cache_matches_full_forward(trained):
  """Greedy with the KV cache == argmax of a full forward pass over the text so far.

  The reference sees the same context as the cache: when the text outgrows the window it
  restarts from the last window // 2 bytes. Each forward pass runs on the context padded to the
  window on the right, which a causal model ignores, so one compilation serves every length.
  """
  params, _ = trained
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
  assert main.generate(CFG, params, prompt, num_bytes, temperature=0.0) == expected


def test_greedy_continues_the_sentence_past_the_window(trained):
  """The sentence (45 bytes) is longer than the window (32): the cache restarts coherently."""
  params, _ = trained
  sentence = b"quick brown fox jumps over the lazy dog. the "
  assert main.generate(CFG, params, b"the ", 90, temperature=0.0) == sentence * 2


def test_bad_text_names_the_path(tmp_path):
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="missing.txt: no such file"):
    main.read_text(missing, seq_len=128)
  short = tmp_path / "short.txt"
  short.write_bytes(b"hello")
  with pytest.raises(ValueError, match=f"{short}: 5 bytes is too short"):
    main.read_text(str(short), seq_len=128)
  assert main.read_text(str(short), seq_len=1) == b"hello"


def test_split_holds_out_the_end():
  train_BT, val_BT = main.split_data(bytes(range(200)) * 10, seq_len=16)
  assert len(val_BT) == 100 and len(train_BT) == 1900
  np.testing.assert_array_equal(val_BT[:3], [100, 101, 102])
