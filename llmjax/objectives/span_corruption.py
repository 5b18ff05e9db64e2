"""T5's span corruption (Raffel et al. 2020, section 3.1.4), written to read against
t5.data.preprocessors.

A chunk of `tokens_length` raw tokens is split into alternating non-noise and noise spans,
starting with non-noise. The inputs keep the non-noise tokens and put one sentinel where each
noise span was; the targets are each sentinel followed by the span it replaced:

    tokens   a b c d e f g h          spans  [a b] [c] [d e f] [g h]
    inputs   a b <X0> d e f <X1>      (no EOS here: the pipeline appends it)
    targets  <X0> c <X1> g h

With noise_density 0.15 and mean span 3, T5 reads 568 raw tokens to make 512 inputs and 114
targets (EOS included), so a batch of chunks is exactly full without padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llmjax.objectives.base import Objective, chunks, segments


def _check_args(noise_density: float, mean_noise_span_length: float) -> None:
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density={noise_density} must lie strictly between 0 and 1")
  if not mean_noise_span_length >= 1.0:
    raise ValueError(f"mean_noise_span_length={mean_noise_span_length} must be at least 1")


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(tokens_length, targets_length), as T5's random_spans_helper: the longest raw chunk whose
  corrupted inputs plus EOS fit in `inputs_length`, and its targets' length plus EOS (at
  density 0.5, one token shorter when that keeps the targets no longer than the inputs)."""
  _check_args(noise_density, mean_noise_span_length)
  if inputs_length < 2:
    raise ValueError(f"inputs_length={inputs_length} is too short for span corruption: "
                     f"it needs at least one token and the EOS")
  def lengths_after(n: int) -> tuple[int, int]:  # (inputs, targets), EOS included: T5's rule
    num_noise = int(round(n * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return n - num_noise + num_spans + 1, num_noise + num_spans + 1
  tokens_length = inputs_length - 1
  while lengths_after(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  inputs_length, targets_length = lengths_after(tokens_length)
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def noise_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) in a chunk of `length` >= 2 tokens: >= 1 of each, not all."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return num_noise, num_spans


def _random_segmentation(rng: np.random.Generator, num_items: int, num_segments: int) -> np.ndarray:
  """Lengths of `num_segments` non-empty runs that add up to `num_items`, uniformly at random."""
  first_in_segment = np.zeros(num_items, bool)
  first_in_segment[1 + rng.choice(num_items - 1, num_segments - 1, replace=False)] = True
  first_in_segment[0] = True
  return np.diff(np.append(np.flatnonzero(first_in_segment), num_items))


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0) -> np.ndarray:
  """Boolean [length]: T5's random_spans_noise_mask, spans alternating, non-noise first."""
  if length < 2:
    raise ValueError(f"a chunk of {length} token(s) is too short for span corruption; need >= 2")
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  # More spans than either kind of token can fill happens only for extreme densities.
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise_lengths = _random_segmentation(rng, num_noise, num_spans)
  nonnoise_lengths = _random_segmentation(rng, length - num_noise, num_spans)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.arange(2 * num_spans) % 2 == 1, interleaved)


def span_corrupt(tokens, *, seed, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                 sentinel_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 of one chunk, no EOS; `seed` is an int or a tuple of ints. The
  same tokens and seed always give the same corruption. `sentinel_ids[k]` replaces the k-th
  noise span; there must be at least as many sentinels as spans."""
  _check_args(noise_density, mean_noise_span_length)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"span_corrupt takes a 1-D array of token ids, got shape {tokens.shape}")
  rng = np.random.default_rng(seed)
  mask = noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
  return corrupt_with_mask(tokens, mask, sentinel_ids)


def corrupt_with_mask(tokens: np.ndarray, mask: np.ndarray,
                      sentinel_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) for a given noise mask: each noise span one sentinel in the inputs."""
  noise_starts = mask & ~np.concatenate([[False], mask[:-1]])
  num_spans = int(noise_starts.sum())
  if num_spans > len(sentinel_ids):
    raise ValueError(f"span corruption made {num_spans} noise spans but only {len(sentinel_ids)} "
                     f"sentinel ids were given; add sentinels to the tokenizer or shorten chunks")
  span_index = np.cumsum(noise_starts) - 1  # which span each token belongs to (-1 before the first)
  sentinels = np.asarray(sentinel_ids, np.int64)[:max(num_spans, 1)]
  # Inputs: the non-noise tokens, and each span's sentinel at the span's first token.
  inputs = np.where(noise_starts, sentinels[span_index], tokens)[~mask | noise_starts]
  # Targets: each span's sentinel, then the span's tokens.
  order = np.argsort(np.concatenate([np.flatnonzero(noise_starts) - 0.5, np.flatnonzero(mask)]),
                     kind="stable")
  targets = np.concatenate([sentinels[:num_spans], tokens[mask]])[order]
  return inputs.astype(np.int32), targets.astype(np.int32)


class SpanCorruption(Objective):
  """T5 pre-training for encoder-decoder models: each document is cut into chunks of the raw
  length that fills `inputs_length` (568 for 512), each corrupted (a document's last, shorter
  chunk too, packed beside others). The decoder reads the targets shifted right behind
  `decoder_start_id` (T5: the pad id, 0)."""

  targets_key, weights_key = "decoder_targets", "decoder_weights"
  architectures = ("encoder_decoder",)

  def __init__(self, tokenizer, inputs_length: int, *, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0, decoder_start_id: int | None = None,
               **loss_options):
    tokenizer.require(eos_id=True)
    super().__init__(tokenizer, **loss_options)
    start = tokenizer.pad_id if decoder_start_id is None else decoder_start_id
    if start is None or not 0 <= start < tokenizer.vocab_size:
      raise ValueError(f"decoder_start_id={start} (default: the pad id) must be an id in "
                       f"[0, {tokenizer.vocab_size}); {tokenizer} has no pad id, so give one")
    self.tokens_length, self.targets_length = span_corruption_lengths(
        inputs_length, noise_density, mean_noise_span_length)
    if self.tokens_length < 2:
      raise ValueError(f"inputs_length={inputs_length} is too short for span corruption")
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    # T5's length arithmetic may round to no noise, but a chunk always gets >= 1 noise span:
    # at short lengths that outgrows the rows, so refuse them here rather than mid-epoch.
    for n in range(2, self.tokens_length + 1):
      noise, spans = noise_counts(n, noise_density, mean_noise_span_length)
      spans = min(spans, noise, n - noise)
      if n - noise + spans + 1 > inputs_length or noise + spans + 1 > self.targets_length:
        raise ValueError(f"inputs_length={inputs_length} is too short for span corruption at "
                         f"noise_density={noise_density}, mean_noise_span_length="
                         f"{mean_noise_span_length}: a {n}-token chunk would not fit")
    _, max_spans = noise_counts(self.tokens_length, noise_density, mean_noise_span_length)
    if len(tokenizer.sentinel_ids) < max_spans:
      raise ValueError(f"{tokenizer} has {len(tokenizer.sentinel_ids)} sentinel ids but chunks of "
                       f"{self.tokens_length} tokens make up to {max_spans} noise spans")
    self.sentinel_ids, self.eos_id, self.start_id = tokenizer.sentinel_ids, tokenizer.eos_id, start
    self.lengths = {"encoder_tokens": inputs_length, "decoder_targets": self.targets_length,
                    "decoder_tokens": self.targets_length}

  def examples(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    out = []
    for chunk in (c for c in chunks(tokens, self.tokens_length) if len(c)):
      if len(chunk) >= 2:
        inputs, targets = span_corrupt(
            chunk, seed=int(rng.integers(2**63)), noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length, sentinel_ids=self.sentinel_ids)
      else:  # one token cannot be split into a kept and a noise span: the model copies it
        inputs, targets = chunk, chunk[:0]
      targets = np.append(targets, self.eos_id).astype(np.int32)
      out.append({"encoder_tokens": np.append(inputs, self.eos_id).astype(np.int32),
                  "decoder_targets": targets,
                  "decoder_tokens": np.append(self.start_id, targets[:-1]).astype(np.int32)})
    return out

  def batch(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    enc_segment_ids, enc_positions = segments(rows, "encoder_tokens")
    dec_segment_ids, dec_positions = segments(rows, "decoder_targets")
    return {"encoder_tokens": rows["encoder_tokens"], "encoder_segment_ids": enc_segment_ids,
            "encoder_positions": enc_positions, "decoder_tokens": rows["decoder_tokens"],
            "decoder_targets": rows["decoder_targets"],
            "decoder_weights": (dec_segment_ids > 0).astype(np.float32),
            "decoder_segment_ids": dec_segment_ids, "decoder_positions": dec_positions}

  def model_args(self, batch):
    return (batch["encoder_tokens"], batch["decoder_tokens"], batch["encoder_segment_ids"],
            batch["decoder_segment_ids"]), {}
