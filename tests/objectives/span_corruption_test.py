"""Tests of llmjax.objectives.span_corruption: T5's length arithmetic, noise mask and corruption."""

import numpy as np
import pytest

from llmjax import objectives
from llmjax.data.tokenizers import ByteTokenizer
from llmjax.objectives import span_corruption

FIRST_SENTINEL = 100_000  # sentinel ids start here; text ids stay below, so they never collide
SENTINELS = tuple(range(FIRST_SENTINEL, FIRST_SENTINEL + 2000))
# (noise_density, mean_noise_span_length): T5's default, denser, its 0.5 special case, long and
# short spans, single-token spans.
SETTINGS = [(0.15, 3.0), (0.3, 3.0), (0.5, 3.0), (0.15, 8.0), (0.25, 2.0), (0.1, 1.0), (0.4, 5.0)]


def _t5_lengths(inputs_length, noise_density, mean_noise_span_length, density_half_rule=True):
  """T5's random_spans_helper (t5.data.preprocessors) with one sentinel per span and one EOS."""
  def inputs_targets(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while inputs_targets(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  inputs, targets = inputs_targets(tokens_length)
  if density_half_rule and noise_density == 0.5 and targets > inputs:
    tokens_length, targets = tokens_length - 1, targets - 1
  return tokens_length, targets


def _t5_counts(length, noise_density, mean_noise_span_length):
  """(noise tokens, noise spans) of T5's random_spans_noise_mask for a chunk of `length` >= 2."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  return num_noise, max(int(round(num_noise / mean_noise_span_length)), 1)


def _runs(mask):
  """The value of each maximal run of equal values of a 1-D boolean array, in order."""
  starts = np.concatenate([[0], np.flatnonzero(mask[1:] != mask[:-1]) + 1])
  return mask[starts]


def _reconstruct(inputs, targets, sentinel_ids):
  """The original tokens: each sentinel of the inputs replaced by what follows it in the targets."""
  sentinel_ids = np.asarray(sentinel_ids)
  in_pos = np.flatnonzero(np.isin(inputs, sentinel_ids))
  out_pos = np.flatnonzero(np.isin(targets, sentinel_ids))
  num_spans = len(in_pos)
  # Sentinel k appears once in each, in order, and the targets start with a sentinel.
  np.testing.assert_array_equal(inputs[in_pos], sentinel_ids[:num_spans])
  np.testing.assert_array_equal(targets[out_pos], sentinel_ids[:num_spans])
  assert num_spans >= 1 and out_pos[0] == 0
  spans = np.split(targets, out_pos[1:])  # each: the sentinel, then its span
  pieces, prev = [], 0
  for k, p in enumerate(in_pos):
    assert len(spans[k]) >= 2, "a sentinel stands for an empty span"
    pieces += [inputs[prev:p], spans[k][1:]]
    prev = p + 1
  pieces.append(inputs[prev:])
  return np.concatenate(pieces)


def _kept(length, seed, noise_density=0.15, mean_noise_span_length=3.0):
  """The noise mask span_corrupt used, read off the corruption of 0, 1, ..., length-1."""
  inputs, _ = objectives.span_corrupt(
      np.arange(length), seed=seed, noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length, sentinel_ids=SENTINELS)
  return ~np.isin(np.arange(length), inputs)


# --- span_corruption_lengths ------------------------------------------------------------------


def test_lengths_t5_published_setting():
  """512 inputs read 568 raw tokens and make 114 targets (T5 paper's setting)."""
  assert objectives.span_corruption_lengths(512) == (568, 114)
  assert objectives.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)


@pytest.mark.parametrize("noise_density,mean_noise_span_length", SETTINGS)
def test_lengths_match_t5_arithmetic(noise_density, mean_noise_span_length):
  """Every inputs_length in 2..1100 gives what T5's random_spans_helper gives."""
  for inputs_length in range(2, 1101):
    got = objectives.span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
    assert got == _t5_lengths(inputs_length, noise_density, mean_noise_span_length), inputs_length


def test_lengths_density_half_special_case():
  """At density 0.5 T5 shortens the chunk by one when its targets would outgrow its inputs."""
  # 767 tokens at 0.5: 384 noise in 128 spans, 512 inputs but 513 targets; so 766 and 512.
  assert _t5_lengths(512, 0.5, 3.0, density_half_rule=False) == (767, 513)
  assert objectives.span_corruption_lengths(512, 0.5, 3.0) == (766, 512)
  shortened = [n for n in range(2, 1101) if objectives.span_corruption_lengths(n, 0.5, 3.0)
               != _t5_lengths(n, 0.5, 3.0, density_half_rule=False)]
  assert len(shortened) > 100
  for n in shortened:
    tokens_length, targets_length = objectives.span_corruption_lengths(n, 0.5, 3.0)
    assert (tokens_length + 1, targets_length + 1) == _t5_lengths(n, 0.5, 3.0, False)


@pytest.mark.parametrize("inputs_length", [0, 1, -5])
def test_lengths_reject_too_short_inputs(inputs_length):
  """No chunk fits inputs of fewer than 2 tokens (one token plus EOS)."""
  with pytest.raises(ValueError):
    objectives.span_corruption_lengths(inputs_length)


@pytest.mark.parametrize("noise_density,mean_noise_span_length",
                         [(0.0, 3.0), (1.0, 3.0), (-0.1, 3.0), (1.5, 3.0), (0.15, 0.5)])
def test_lengths_reject_bad_settings(noise_density, mean_noise_span_length):
  """Densities outside (0, 1) and mean spans below 1 are refused."""
  with pytest.raises(ValueError):
    objectives.span_corruption_lengths(512, noise_density, mean_noise_span_length)


# --- noise_mask -------------------------------------------------------------------------------


def test_noise_mask_exact_counts_every_length():
  """Each length 2..2048 at T5's default: T5's noise and span counts, spans alternating."""
  rng = np.random.default_rng(0)
  for length in range(2, 2049):
    num_noise, num_spans = _t5_counts(length, 0.15, 3.0)
    assert span_corruption.noise_counts(length, 0.15, 3.0) == (num_noise, num_spans)
    mask = objectives.noise_mask(length, rng, 0.15, 3.0)
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == num_noise, length
    runs = _runs(mask)
    # Runs alternate by construction; starting non-noise and ending noise makes the counts equal.
    assert not runs[0] and runs[-1], length
    assert (runs.sum(), (~runs).sum()) == (num_spans, num_spans), length


@pytest.mark.parametrize("noise_density,mean_noise_span_length",
                         SETTINGS + [(0.9, 1.0), (0.05, 1.0), (0.6, 1.5)])
def test_noise_mask_counts_other_settings(noise_density, mean_noise_span_length):
  """Exact noise count; T5's span count, but never more than either kind of token can fill."""
  rng = np.random.default_rng(1)
  for length in list(range(2, 300)) + list(rng.integers(300, 3000, 100)):
    num_noise, num_spans = _t5_counts(length, noise_density, mean_noise_span_length)
    mask = objectives.noise_mask(int(length), rng, noise_density, mean_noise_span_length)
    assert mask.sum() == num_noise
    runs = _runs(mask)
    assert not runs[0] and runs[-1]
    assert len(runs) == 2 * min(num_spans, num_noise, length - num_noise)


def test_noise_mask_span_lengths_are_uniform():
  """40 tokens make 2 spans: the first kept run (1..33) and first noise span (1..5) are uniform."""
  # 40 tokens: 6 noise in 2 spans, 34 kept in 2 runs; each split is uniform over its cut points.
  num_trials, kept_first, noise_first = 10_000, [], []
  for seed in range(num_trials):
    mask = objectives.noise_mask(40, np.random.default_rng(seed))
    kept_first.append(np.argmax(mask))
    noise_first.append(np.argmin(mask[kept_first[-1]:]))
  for lengths, most in ((kept_first, 33), (noise_first, 5)):
    counts = np.bincount(lengths, minlength=most + 2)
    assert counts[0] == 0 and counts[most + 1:].sum() == 0, counts
    p = 1 / most
    bound = 5 * np.sqrt(num_trials * p * (1 - p))
    assert np.all(np.abs(counts[1:most + 1] - num_trials * p) < bound), counts


@pytest.mark.parametrize("length", [0, 1])
def test_noise_mask_rejects_short_chunks(length):
  """Fewer than 2 tokens cannot hold a kept span and a noise span."""
  with pytest.raises(ValueError):
    objectives.noise_mask(length, np.random.default_rng(0))


# --- span_corrupt -----------------------------------------------------------------------------


def test_corrupt_with_mask_docstring_example():
  """The module docstring's example: spans [a b] [c] [d e f] [g h]."""
  a, b, c, d, e, f, g, h = range(10, 18)
  x0, x1 = 100, 101
  mask = np.array([0, 0, 1, 0, 0, 0, 1, 1], bool)
  inputs, targets = span_corruption.corrupt_with_mask(np.array([a, b, c, d, e, f, g, h]), mask,
                                                      [x0, x1, 102])
  np.testing.assert_array_equal(inputs, [a, b, x0, d, e, f, x1])
  np.testing.assert_array_equal(targets, [x0, c, x1, g, h])
  assert inputs.dtype == np.int32 and targets.dtype == np.int32


def test_span_corrupt_reconstructs_tokens():
  """Interleaving inputs and targets at the sentinels gives back the chunk, in 3000 cases."""
  rng = np.random.default_rng(2)
  for _ in range(3000):
    length = int(rng.integers(2, 1500))
    noise_density, mean_noise_span_length = SETTINGS[rng.integers(len(SETTINGS))]
    tokens = rng.integers(0, FIRST_SENTINEL, length)
    inputs, targets = objectives.span_corrupt(
        tokens, seed=int(rng.integers(2**63)), noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length, sentinel_ids=SENTINELS)
    assert inputs.ndim == targets.ndim == 1
    num_noise, num_spans = _t5_counts(length, noise_density, mean_noise_span_length)
    num_spans = min(num_spans, length - num_noise)
    assert len(inputs) == length - num_noise + num_spans
    assert len(targets) == num_noise + num_spans
    np.testing.assert_array_equal(_reconstruct(inputs, targets, SENTINELS), tokens)


def test_span_corrupt_is_deterministic_in_seed():
  """The same seed (int or tuple) gives the same corruption, whatever the token values."""
  tokens = np.random.default_rng(3).integers(0, FIRST_SENTINEL, 568)
  for seed in (0, 7, 2**62, (3, 4), (5, 6, 7)):
    first = objectives.span_corrupt(tokens, seed=seed, sentinel_ids=SENTINELS)
    again = objectives.span_corrupt(tokens.copy(), seed=seed, sentinel_ids=SENTINELS)
    for x, y in zip(first, again):
      np.testing.assert_array_equal(x, y)
    # The mask depends on the length and the seed only.
    arange_inputs, _ = objectives.span_corrupt(np.arange(568), seed=seed, sentinel_ids=SENTINELS)
    np.testing.assert_array_equal(np.isin(first[0], SENTINELS), np.isin(arange_inputs, SENTINELS))


def test_span_corrupt_different_seeds_differ():
  """200 seeds give 200 different masks of a 568-token chunk."""
  masks = {_kept(568, seed).tobytes() for seed in range(200)}
  assert len(masks) == 200
  assert _kept(568, (1, 2)).tobytes() != _kept(568, (2, 1)).tobytes()


@pytest.mark.parametrize("length", [0, 1])
def test_span_corrupt_rejects_short_chunks(length):
  """A chunk of 0 or 1 tokens cannot be span-corrupted."""
  with pytest.raises(ValueError):
    objectives.span_corrupt(np.arange(length), seed=0, sentinel_ids=SENTINELS)


def test_span_corrupt_needs_a_sentinel_per_span():
  """568 tokens make 28 spans: 28 sentinel ids suffice, 27 raise an error naming the sentinels."""
  tokens = np.arange(568)
  inputs, targets = objectives.span_corrupt(tokens, seed=0, sentinel_ids=SENTINELS[:28])
  np.testing.assert_array_equal(_reconstruct(inputs, targets, SENTINELS[:28]), tokens)
  with pytest.raises(ValueError, match="sentinel"):
    objectives.span_corrupt(tokens, seed=0, sentinel_ids=SENTINELS[:27])
  with pytest.raises(ValueError, match="sentinel"):
    objectives.span_corrupt(tokens, seed=0, sentinel_ids=())


def test_span_corrupt_rejects_2d_tokens():
  """Only a 1-D chunk is accepted."""
  with pytest.raises(ValueError):
    objectives.span_corrupt(np.zeros((2, 100), np.int32), seed=0, sentinel_ids=SENTINELS)


@pytest.mark.parametrize("noise_density", [0.0, 1.0, -0.2, 1.2])
def test_span_corrupt_rejects_density_outside_unit_interval(noise_density):
  """noise_density must lie strictly between 0 and 1."""
  with pytest.raises(ValueError):
    objectives.span_corrupt(np.arange(100), seed=0, noise_density=noise_density,
                            sentinel_ids=SENTINELS)


# --- SpanCorruption ---------------------------------------------------------------------------

TOKENIZER = ByteTokenizer()


def _doc(rng, length):
  """Byte tokens of a random document: never a special id or sentinel."""
  return rng.integers(TOKENIZER.offset, TOKENIZER.offset + 256, length).astype(np.int32)


def _doc_lengths(rng, tokens_length):
  edges = [0, 1, 2, 3, tokens_length - 1, tokens_length, tokens_length + 1, tokens_length + 2,
           2 * tokens_length, 3 * tokens_length + 1]
  return [n for n in edges if n >= 0] + list(rng.integers(0, 4 * tokens_length, 40))


def test_objective_t5_default():
  """SpanCorruption(512) reads 568-token chunks and declares 512 encoder and 114 decoder tokens."""
  obj = objectives.SpanCorruption(TOKENIZER, 512)
  assert (obj.tokens_length, obj.targets_length) == (568, 114)
  assert obj.lengths == {"encoder_tokens": 512, "decoder_targets": 114, "decoder_tokens": 114}


@pytest.mark.parametrize("noise_density,mean_noise_span_length",
                         [(0.15, 3.0), (0.3, 3.0), (0.15, 8.0), (0.25, 2.0)])
def test_objective_full_chunk_fills_lengths_exactly(noise_density, mean_noise_span_length):
  """A document of exactly tokens_length gives one example of exactly the declared lengths."""
  tokenizer, rng = ByteTokenizer(num_sentinels=300), np.random.default_rng(4)
  for inputs_length in range(32, 700, 3):
    obj = objectives.SpanCorruption(tokenizer, inputs_length, noise_density=noise_density,
                                    mean_noise_span_length=mean_noise_span_length)
    (example,) = obj.examples(_doc(rng, obj.tokens_length), rng)
    assert {k: len(v) for k, v in example.items()} == obj.lengths, inputs_length
    assert obj.lengths["encoder_tokens"] == inputs_length


@pytest.mark.parametrize("inputs_length,noise_density,mean_noise_span_length", [
    (512, 0.15, 3.0), (64, 0.15, 3.0), (100, 0.5, 3.0), (512, 0.5, 3.0), (256, 0.3, 3.0),
    (64, 0.15, 8.0), (128, 0.25, 2.0), (10, 0.15, 3.0)])
def test_objective_examples_fit_lengths(inputs_length, noise_density, mean_noise_span_length):
  """Every example of documents of any length fits the declared lengths."""
  obj = objectives.SpanCorruption(ByteTokenizer(num_sentinels=200), inputs_length,
                                  noise_density=noise_density,
                                  mean_noise_span_length=mean_noise_span_length)
  rng = np.random.default_rng(5)
  for n in _doc_lengths(rng, obj.tokens_length):
    for example in obj.examples(_doc(rng, n), rng):
      assert set(example) == set(obj.lengths)
      for key, value in example.items():
        assert 1 <= len(value) <= obj.lengths[key], (n, key, len(value))


@pytest.mark.parametrize("noise_density,mean_noise_span_length",
                         [(0.15, 3.0), (0.3, 3.0), (0.15, 8.0), (0.1, 1.0)])
def test_objective_short_inputs_fit_or_are_refused(noise_density, mean_noise_span_length):
  """At every short inputs_length the objective is refused up front or all its examples fit.

  T5's arithmetic can budget zero noise spans while a chunk always gets one; such lengths
  must fail in the constructor, never mid-epoch. Lengths of 30 and more are always accepted.
  """
  rng = np.random.default_rng(6)
  for inputs_length in range(2, 60):
    try:
      obj = objectives.SpanCorruption(TOKENIZER, inputs_length, noise_density=noise_density,
                                      mean_noise_span_length=mean_noise_span_length)
    except ValueError as e:
      assert f"inputs_length={inputs_length}" in str(e)
      assert inputs_length < 30, (inputs_length, str(e))
      continue
    for n in range(1, obj.tokens_length + 1):
      for example in obj.examples(_doc(rng, n), rng):
        got = {k: len(v) for k, v in example.items()}
        assert all(got[k] <= obj.lengths[k] for k in got), (inputs_length, n, got, obj.lengths)


@pytest.mark.parametrize("decoder_start_id", [None, 5])
def test_objective_decoder_tokens_shift_targets(decoder_start_id):
  """Encoder and decoder targets end with EOS; decoder tokens are the targets shifted right."""
  obj = objectives.SpanCorruption(TOKENIZER, 128, decoder_start_id=decoder_start_id)
  start = TOKENIZER.pad_id if decoder_start_id is None else decoder_start_id
  rng = np.random.default_rng(7)
  for n in _doc_lengths(rng, obj.tokens_length):
    for example in obj.examples(_doc(rng, n), rng):
      enc, tgt = example["encoder_tokens"], example["decoder_targets"]
      dec = example["decoder_tokens"]
      assert enc.dtype == tgt.dtype == dec.dtype == np.int32
      assert enc[-1] == tgt[-1] == TOKENIZER.eos_id
      assert TOKENIZER.eos_id not in enc[:-1] and TOKENIZER.eos_id not in tgt[:-1]
      assert len(dec) == len(tgt) and dec[0] == start
      np.testing.assert_array_equal(dec[1:], tgt[:-1])


def test_objective_examples_reconstruct_document():
  """A document's examples, each un-corrupted and concatenated in order, give back the document."""
  obj = objectives.SpanCorruption(TOKENIZER, 128)
  rng = np.random.default_rng(8)
  assert obj.examples(np.zeros(0, np.int32), rng) == []
  for n in _doc_lengths(rng, obj.tokens_length)[1:]:
    doc = _doc(rng, n)
    examples = obj.examples(doc, rng)
    assert len(examples) == -(-n // obj.tokens_length)
    pieces = []
    for example in examples:
      enc, tgt = example["encoder_tokens"][:-1], example["decoder_targets"][:-1]
      if len(tgt) == 0:  # a lone last token is copied, not corrupted
        assert len(enc) == 1
        pieces.append(enc)
      else:
        pieces.append(_reconstruct(enc, tgt, TOKENIZER.sentinel_ids))
    np.testing.assert_array_equal(np.concatenate(pieces), doc)


def test_objective_examples_deterministic_in_rng():
  """Equal generators give equal examples; the generator's stream, not the call, decides."""
  obj = objectives.SpanCorruption(TOKENIZER, 128)
  doc = _doc(np.random.default_rng(9), 1000)
  a = obj.examples(doc, np.random.default_rng(10))
  b = obj.examples(doc, np.random.default_rng(10))
  c = obj.examples(doc, np.random.default_rng(11))
  assert len(a) == len(b) == len(c)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["encoder_tokens"], z["encoder_tokens"]) for x, z in zip(a, c))


def test_objective_needs_enough_sentinels():
  """512 inputs make up to 28 spans: 28 sentinels suffice for any document, fewer are refused."""
  with pytest.raises(ValueError, match="sentinel"):
    objectives.SpanCorruption(ByteTokenizer(num_sentinels=2), 512)
  with pytest.raises(ValueError, match="sentinel"):
    objectives.SpanCorruption(ByteTokenizer(num_sentinels=27), 512)
  obj = objectives.SpanCorruption(ByteTokenizer(num_sentinels=28), 512)
  rng = np.random.default_rng(12)
  for n in _doc_lengths(rng, obj.tokens_length):
    obj.examples(_doc(rng, n), rng)  # no sentinel shortage at any chunk length
