"""CausalLM windows: every token a target exactly once, with or without a random offset; a
short last window reaches back to full length with its re-read targets weighted 0."""

import numpy as np
import pytest

from llmjax import data, objectives


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 64, 100])
@pytest.mark.parametrize("random_offset", [False, True])
def test_windows_make_every_token_a_target_once(length, random_offset):
  tok = data.ByteTokenizer()
  objective = objectives.CausalLM(tok, 8, random_offset=random_offset)
  tokens = np.arange(10, 10 + length, dtype=np.int32)
  full = np.concatenate([[tok.bos_id], tokens, [tok.eos_id]])
  for seed in range(20):
    examples = objective.examples(tokens, np.random.default_rng(seed))
    targets = np.concatenate([e["targets"][e["weights"] > 0] for e in examples])
    np.testing.assert_array_equal(targets, full[1:])
    for e in examples:  # each target follows its own input, within a window of <= 8
      assert 1 <= len(e["tokens"]) == len(e["targets"]) == len(e["weights"]) <= 8
      np.testing.assert_array_equal(e["tokens"][1:], e["targets"][:-1])
      assert (np.diff(e["weights"]) >= 0).all()  # re-read targets (weight 0) come first only
    if not random_offset or len(examples) == 1:  # full windows but a lone one
      assert all(len(e["tokens"]) == min(8, len(full) - 1) for e in examples)
    assert all(len(e["tokens"]) == min(8, len(full) - 1) for e in examples[1:])  # reach back


def test_random_offset_moves_the_window_grid():
  """With random_offset the first window's length varies with the rng (all of 1..8 occur);
  the windows after it are full; without it every draw gives the same windows."""
  tok = data.ByteTokenizer()
  tokens = np.arange(10, 110, dtype=np.int32)
  shifted = objectives.CausalLM(tok, 8, add_bos=False, add_eos=False, random_offset=True)
  firsts = set()
  for seed in range(200):
    examples = shifted.examples(tokens, np.random.default_rng(seed))
    firsts.add(len(examples[0]["tokens"]))
    assert all(len(e["tokens"]) == 8 for e in examples[1:])
  assert firsts == set(range(1, 9))
  plain = objectives.CausalLM(tok, 8, add_bos=False, add_eos=False)
  assert "random_offset=True" in repr(shifted) and "random_offset=False" in repr(plain)
