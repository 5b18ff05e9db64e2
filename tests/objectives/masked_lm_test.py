"""Tests of llmjax.objectives.masked_lm: BERT's selection budget, 80/10/10 split, whole words."""

import numpy as np
import pytest

from llmjax import objectives
from llmjax.data.tokenizers import ByteTokenizer
from llmjax.objectives import masked_lm

VOCAB, MASK = 1000, 3
SPECIALS = (0, 1, 2, 500, 999)  # padding first; two more inside the vocabulary and at its end
ALL_SPECIALS = np.array(SPECIALS + (MASK,))  # mask_tokens treats mask_id as special too
TEXT_IDS = np.setdiff1d(np.arange(VOCAB), ALL_SPECIALS)  # the ids a replacement may take


def _sigma5(n, p):
  """Five binomial standard deviations of a count of n trials with probability p."""
  return 5 * np.sqrt(n * p * (1 - p))


def _sequence(rng, length, special_rate=0.1, padding=0):
  """Text ids with specials sprinkled in (and a mask id already present), then padding."""
  tokens = rng.choice(TEXT_IDS, length)
  specials = rng.random(length) < special_rate
  tokens[specials] = rng.choice(ALL_SPECIALS, specials.sum())
  return np.concatenate([tokens, np.zeros(padding, tokens.dtype)])


def _budget(tokens, rate=0.15, max_predictions=None, special_ids=ALL_SPECIALS):
  """BERT's count of chosen tokens: round(rate * maskable), at least 1, at most max_predictions."""
  maskable = int(np.sum(~np.isin(tokens, special_ids)))
  budget = max(1, int(round(rate * maskable))) if maskable else 0
  return budget if max_predictions is None else min(budget, max_predictions)


def _mask(tokens, seed, **kwargs):
  return objectives.mask_tokens(tokens, seed=seed, vocab_size=VOCAB, mask_id=MASK,
                                special_ids=SPECIALS, **kwargs)


def _check(tokens, inputs, targets, weights, special_ids=ALL_SPECIALS, vocab_size=VOCAB,
           mask_id=MASK):
  """What holds for every output: targets are the tokens, only chosen non-specials change."""
  assert inputs.shape == targets.shape == weights.shape == tokens.shape
  assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
  np.testing.assert_array_equal(targets, tokens)
  assert set(np.unique(weights)) <= {0.0, 1.0}
  chosen = weights == 1
  assert not np.any(chosen & np.isin(tokens, special_ids)), "a special token was chosen"
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
  replaced = chosen & (inputs != mask_id) & (inputs != tokens)
  assert not np.any(np.isin(inputs[replaced], special_ids)), "a random replacement is special"
  assert np.all((inputs[replaced] >= 0) & (inputs[replaced] < vocab_size))


def _words(tokens, word_starts, special_ids=ALL_SPECIALS):
  """Word number of each token (-1 for specials): words begin at word starts and after specials."""
  special = np.isin(tokens, special_ids)
  begins = (np.asarray(word_starts, bool) | np.concatenate([[True], special[:-1]])) & ~special
  return np.where(special, -1, np.cumsum(begins) - 1)


def _check_whole_words(weights, words):
  """Every word is chosen whole or not at all."""
  for w in np.unique(words[words >= 0]):
    chosen = weights[words == w]
    assert chosen.min() == chosen.max(), f"word {w} is partly chosen: {chosen}"


# --- mask_tokens ------------------------------------------------------------------------------


def test_chosen_count_is_bert_budget():
  """Exactly round(rate * maskable) tokens (at least 1) are chosen, whatever the length and rate."""
  rng = np.random.default_rng(0)
  for i in range(600):
    tokens = _sequence(rng, int(rng.integers(1, 600)), special_rate=rng.choice([0.0, 0.1, 0.5]),
                       padding=int(rng.integers(0, 50)))
    rate = float(rng.choice([0.15, 0.2, 0.5, 0.01, 1.0]))
    inputs, targets, weights = _mask(tokens, i, rate=rate)
    _check(tokens, inputs, targets, weights)
    assert weights.sum() == _budget(tokens, rate), (len(tokens), rate)


def test_selection_rate_and_80_10_10_split():
  """Over 300k tokens: 15% chosen; of those 80% [MASK], 10% random, 10% kept, within 5 sigma."""
  rng = np.random.default_rng(1)
  num_chosen = num_maskable = num_masked = num_random = num_kept = 0
  for seed in range(600):
    tokens = _sequence(rng, 512, padding=int(rng.integers(0, 32)))
    inputs, targets, weights = _mask(tokens, seed)
    _check(tokens, inputs, targets, weights)
    chosen = weights == 1
    num_maskable += np.sum(~np.isin(tokens, ALL_SPECIALS))
    num_chosen += chosen.sum()
    num_masked += np.sum(chosen & (inputs == MASK))
    num_random += np.sum(chosen & (inputs != MASK) & (inputs != tokens))
    num_kept += np.sum(chosen & (inputs == tokens))
  assert num_maskable >= 250_000
  # The count is rounded once per sequence, so the rate is exact up to half a token each.
  assert abs(num_chosen - 0.15 * num_maskable) <= 0.5 * 600
  # A random replacement equals the original token with probability 1 / len(TEXT_IDS).
  same = 1 / len(TEXT_IDS)
  for count, p in ((num_masked, 0.8), (num_random, 0.1 * (1 - same)), (num_kept, 0.1 + 0.1 * same)):
    assert abs(count - num_chosen * p) < _sigma5(num_chosen, p), (count, num_chosen, p)


def test_every_maskable_position_equally_likely():
  """Each non-special position is chosen with probability budget / maskable; specials never."""
  tokens = _sequence(np.random.default_rng(2), 64, special_rate=0.2, padding=8)
  maskable = ~np.isin(tokens, ALL_SPECIALS)
  num_trials, p = 4000, _budget(tokens) / maskable.sum()
  counts = sum(_mask(tokens, seed)[2] for seed in range(num_trials))
  assert np.all(counts[~maskable] == 0)
  assert np.all(np.abs(counts[maskable] - num_trials * p) < _sigma5(num_trials, p)), counts
  # Pooled over each half of the positions, a drift along the sequence shows up much sooner
  # (a half's count per trial is hypergeometric: its variance is below the binomial's).
  for half in np.array_split(np.flatnonzero(maskable), 2):
    n = num_trials * len(half)
    assert abs(counts[half].sum() - n * p) < _sigma5(n, p), counts


def test_random_replacements_cover_exactly_the_non_special_ids():
  """With a 12-id vocabulary, replacements take every non-special id and never a special one."""
  vocab_size, special_ids, mask_id = 12, (0, 1, 7, 11), 4
  allowed = np.array([2, 3, 5, 6, 8, 9, 10])
  rng = np.random.default_rng(3)
  seen = set()
  for seed in range(400):
    tokens = rng.choice(allowed, 100)
    inputs, targets, weights = objectives.mask_tokens(
        tokens, seed=seed, vocab_size=vocab_size, mask_id=mask_id, special_ids=special_ids)
    _check(tokens, inputs, targets, weights, special_ids + (mask_id,), vocab_size, mask_id)
    seen |= set(inputs[(weights == 1) & (inputs != mask_id)].tolist())
  assert seen == set(allowed.tolist())


def test_random_non_special_is_uniform_over_allowed_ids():
  """random_non_special draws each allowed id equally often; out-of-range specials are ignored."""
  vocab_size = 12
  special_ids = np.array([0, 3, 4, 7, 11, -1, 40])
  allowed = [1, 2, 5, 6, 8, 9, 10]
  n = 70_000
  draws = masked_lm.random_non_special(np.random.default_rng(4), n, vocab_size, special_ids)
  assert draws.shape == (n,)
  counts = np.bincount(draws, minlength=vocab_size)
  assert len(counts) == vocab_size
  p = 1 / len(allowed)
  assert np.all(counts[np.setdiff1d(np.arange(vocab_size), allowed)] == 0), counts
  assert np.all(np.abs(counts[allowed] - n * p) < _sigma5(n, p)), counts


def test_specials_and_padding_never_chosen():
  """A sequence of mostly specials and padding: only its few text tokens can be chosen."""
  rng = np.random.default_rng(5)
  for seed in range(300):
    tokens = _sequence(rng, 40, special_rate=0.9, padding=40)
    inputs, targets, weights = _mask(tokens, seed, rate=1.0)
    _check(tokens, inputs, targets, weights)
    np.testing.assert_array_equal(weights, (~np.isin(tokens, ALL_SPECIALS)).astype(np.float32))


def test_nothing_maskable_chooses_nothing():
  """Only specials: no position is chosen and nothing changes, with or without whole words."""
  tokens = np.array([1, 0, 2, MASK, 500, 999, 0, 0])
  for word_starts in (None, np.ones(len(tokens), bool)):
    inputs, targets, weights = _mask(tokens, 0, word_starts=word_starts)
    _check(tokens, inputs, targets, weights)
    assert weights.sum() == 0


def test_same_seed_same_masks_different_seeds_differ():
  """A seed (int or tuple) fixes the output; 100 seeds give 100 different choices."""
  tokens = _sequence(np.random.default_rng(6), 256, padding=10)
  for seed in (0, 123, 2**62, (1, 2), (3, 4, 5)):
    first, again = _mask(tokens, seed), _mask(tokens.copy(), seed)
    for x, y in zip(first, again):
      np.testing.assert_array_equal(x, y)
  assert len({_mask(tokens, seed)[2].tobytes() for seed in range(100)}) == 100
  assert _mask(tokens, (1, 2))[2].tobytes() != _mask(tokens, (2, 1))[2].tobytes()


def test_max_predictions_caps_the_count():
  """The count is min(budget, max_predictions)."""
  rng = np.random.default_rng(7)
  tokens = _sequence(rng, 512, padding=0)
  budget = _budget(tokens)
  assert budget > 60
  for max_predictions in (0, 1, 20, budget - 1, budget, budget + 1, 10**6):
    inputs, targets, weights = _mask(tokens, max_predictions, max_predictions=max_predictions)
    _check(tokens, inputs, targets, weights)
    assert weights.sum() == min(budget, max_predictions)


def test_whole_word_masking_chooses_whole_words_within_budget():
  """With word starts, every word is chosen whole or not at all, and the count stays in budget."""
  rng = np.random.default_rng(8)
  for seed in range(500):
    tokens = _sequence(rng, int(rng.integers(1, 300)), special_rate=rng.choice([0.0, 0.1]),
                       padding=int(rng.integers(0, 20)))
    word_starts = rng.random(len(tokens)) < rng.choice([0.2, 0.5, 0.9])
    rate = float(rng.choice([0.15, 0.4]))
    max_predictions = rng.choice([None, 5, 20])
    inputs, targets, weights = _mask(tokens, seed, rate=rate, max_predictions=max_predictions,
                                     word_starts=word_starts)
    _check(tokens, inputs, targets, weights)
    _check_whole_words(weights, _words(tokens, word_starts))
    assert weights.sum() <= _budget(tokens, rate, max_predictions)


def test_whole_word_masking_fills_budget_with_one_token_words():
  """When every token is its own word, whole-word masking chooses exactly the budget."""
  rng = np.random.default_rng(9)
  for seed in range(200):
    tokens = _sequence(rng, int(rng.integers(1, 300)), padding=5)
    inputs, targets, weights = _mask(tokens, seed, word_starts=np.ones(len(tokens), bool))
    _check(tokens, inputs, targets, weights)
    assert weights.sum() == _budget(tokens)


def test_whole_word_masking_fills_budget_when_single_tokens_can():
  """A word that would overshoot is skipped, not the end of the choice: one-token words fill up."""
  rng = np.random.default_rng(10)
  for seed in range(200):
    tokens = rng.choice(TEXT_IDS, 512)
    word_lengths = rng.choice([1, 1, 1, 2, 3, 5], 512)
    starts = np.cumsum(word_lengths) - word_lengths
    word_starts = np.isin(np.arange(512), starts)
    words = _words(tokens, word_starts)
    assert np.sum(np.bincount(words) == 1) >= _budget(tokens)  # singletons alone fill the budget
    weights = _mask(tokens, seed, word_starts=word_starts)[2]
    _check_whole_words(weights, words)
    assert weights.sum() == _budget(tokens)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_rejects_rate_outside_unit_interval(rate):
  """rate must lie in (0, 1]."""
  with pytest.raises(ValueError):
    _mask(np.arange(10, 30), 0, rate=rate)


def test_rejects_2d_tokens():
  """Only a 1-D sequence is accepted."""
  with pytest.raises(ValueError):
    _mask(np.full((2, 10), 10), 0)


@pytest.mark.parametrize("shape", [(19,), (21,), (1, 20), (20, 1)])
def test_rejects_word_starts_of_wrong_shape(shape):
  """word_starts must have one entry per token."""
  with pytest.raises(ValueError):
    _mask(np.arange(10, 30), 0, word_starts=np.ones(shape, bool))


# --- MaskedLM ---------------------------------------------------------------------------------

TOKENIZER = ByteTokenizer()
TOKENIZER_SPECIALS = np.array(sorted(TOKENIZER.special_ids))


def _text(rng, num_words):
  """Random words of 1-8 letters (some multi-byte) joined by spaces and newlines."""
  letters = list("abcdefghij") + ["\u00e9", "\u4e2d"]
  words = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(num_words)]
  return "".join(w + rng.choice([" ", " ", "\n"]) for w in words)


@pytest.mark.parametrize("whole_word", [False, True])
def test_objective_examples(whole_word):
  """[CLS] piece [SEP] rows that fit seq_len, rebuild the document, never choose [CLS] or [SEP]."""
  seq_len = 128
  obj = objectives.MaskedLM(TOKENIZER, seq_len, whole_word=whole_word)
  assert obj.lengths == {"tokens": seq_len, "targets": seq_len, "weights": seq_len}
  rng = np.random.default_rng(11)
  for num_words in (1, 10, 60, 200, 500):
    doc = TOKENIZER.encode(_text(rng, num_words))
    examples = obj.examples(doc, rng)
    assert len(examples) == -(-len(doc) // (seq_len - 2))
    for i, example in enumerate(examples):
      tokens, targets, weights = example["tokens"], example["targets"], example["weights"]
      _check(targets, tokens, targets, weights, TOKENIZER_SPECIALS, TOKENIZER.vocab_size,
             TOKENIZER.mask_id)
      assert len(tokens) <= seq_len and (len(tokens) == seq_len or i == len(examples) - 1)
      assert tokens[0] == targets[0] == TOKENIZER.cls_id
      assert tokens[-1] == targets[-1] == TOKENIZER.sep_id
      assert weights[0] == weights[-1] == 0
      if whole_word:
        _check_whole_words(weights, _words(targets, TOKENIZER.word_starts(targets),
                                           TOKENIZER_SPECIALS))
        assert 1 <= weights.sum() <= _budget(targets, special_ids=TOKENIZER_SPECIALS)
      else:
        assert weights.sum() == _budget(targets, special_ids=TOKENIZER_SPECIALS)
    np.testing.assert_array_equal(np.concatenate([e["targets"][1:-1] for e in examples]), doc)


def test_objective_max_predictions_and_rate():
  """rate and max_predictions reach mask_tokens: the count is min(round(rate * n), cap)."""
  rng = np.random.default_rng(12)
  doc = TOKENIZER.encode(_text(rng, 400))
  for rate, max_predictions in ((0.15, 5), (0.5, None), (0.5, 40)):
    obj = objectives.MaskedLM(TOKENIZER, 256, mask_rate=rate, max_predictions=max_predictions)
    for example in obj.examples(doc, rng):
      expected = _budget(example["targets"], rate, max_predictions, TOKENIZER_SPECIALS)
      assert example["weights"].sum() == expected


def test_objective_rejects_too_short_rows():
  """A row must hold [CLS], [SEP] and at least one token."""
  with pytest.raises(ValueError):
    objectives.MaskedLM(TOKENIZER, 2)
  objectives.MaskedLM(TOKENIZER, 3)
