"""BERT's masked-LM corruption (Devlin et al. 2019, section 3.1 and appendix A.1).

Choose `rate` of the maskable tokens (never a special token such as [CLS], [SEP] or padding),
at most `max_predictions` of them; replace 80% of the chosen by [MASK], 10% by a random token
and leave 10% as they are. The loss is taken only at the chosen positions. With whole-word
masking the choice is made over words (a word token and the continuation pieces after it),
as in BERT's `create_pretraining_data.py`. Two deliberate differences from that script: the
15% is of the maskable tokens (it counts [CLS] and [SEP] too, so it picks one more token in
a few rows), and random replacements are never special ids (it may insert a [SEP] or [PAD]).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from llmjax.objectives.base import Objective, chunks

MASK_PROB, RANDOM_PROB = 0.8, 0.1  # of the chosen tokens; the remaining 10% stay unchanged


def random_non_special(rng: np.random.Generator, n: int, vocab_size: int,
                       special_ids: np.ndarray) -> np.ndarray:
  """n ids drawn uniformly from [0, vocab_size) without the special ids."""
  specials = np.unique(special_ids[(special_ids >= 0) & (special_ids < vocab_size)])
  draws = rng.integers(0, vocab_size - len(specials), size=n)
  # Shift each draw past the specials at or below it: a rank among the allowed ids -> the id.
  return draws + np.searchsorted(specials - np.arange(len(specials)), draws, side="right")


def mask_tokens(tokens, *, seed, vocab_size: int, mask_id: int, special_ids: Iterable[int],
                rate: float = 0.15, max_predictions: int | None = None,
                word_starts=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, weights) of one sequence under BERT's rule; `seed` is an int or tuple
  of ints. `targets` are the original tokens; `weights` (float32) is 1 at the chosen positions
  and 0 elsewhere. `round(rate * maskable)` tokens are chosen (at least 1 if any token is
  maskable), capped at `max_predictions`. `word_starts` (bool per token) turns on whole-word
  masking: whole words are chosen until the budget is met, skipping any that would overshoot."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"mask_tokens takes a 1-D array of token ids, got shape {tokens.shape}")
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"rate={rate} must be in (0, 1]")
  special = np.asarray(sorted({*map(int, special_ids), int(mask_id)}), np.int64)
  if word_starts is not None and np.shape(word_starts) != tokens.shape:
    raise ValueError(f"word_starts has shape {np.shape(word_starts)}, tokens {tokens.shape}")
  rng = np.random.default_rng(seed)

  candidates = np.flatnonzero(~np.isin(tokens, special))
  budget = max(1, int(round(len(candidates) * rate))) if len(candidates) else 0
  if max_predictions is not None:
    budget = min(budget, max_predictions)
  if word_starts is None:
    positions = rng.choice(candidates, budget, replace=False)
  else:  # whole words: a new one begins at a word start or after a gap (a special token)
    starts = np.asarray(word_starts, bool)[candidates]
    starts[1:] |= np.diff(candidates) > 1
    starts[:1] = True
    words = np.split(candidates, np.flatnonzero(starts)[1:])
    chosen, num_chosen = [], 0
    for i in rng.permutation(len(words)):
      if num_chosen + len(words[i]) <= budget:  # BERT skips a word that would overshoot
        chosen.append(words[i])
        num_chosen += len(words[i])
    positions = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)

  inputs = tokens.copy()
  action = rng.random(len(positions))
  to_mask = positions[action < MASK_PROB]
  to_random = positions[(action >= MASK_PROB) & (action < MASK_PROB + RANDOM_PROB)]
  inputs[to_mask] = mask_id
  inputs[to_random] = random_non_special(rng, len(to_random), vocab_size, special)
  weights = np.zeros(tokens.shape, np.float32)
  weights[positions] = 1.0
  return inputs.astype(np.int32), tokens.astype(np.int32), weights


class MaskedLM(Objective):
  """BERT pre-training: [CLS] piece [SEP] rows with `mask_tokens` applied; loss on the chosen."""

  architectures = ("encoder",)

  def __init__(self, tokenizer, seq_len: int, *, mask_rate: float = 0.15,
               max_predictions: int | None = None, whole_word: bool = False, **loss_options):
    if seq_len < 3:
      raise ValueError(f"seq_len={seq_len} is too short for masked LM: [CLS] and [SEP] leave "
                       f"no room for a token")
    if not 0.0 < mask_rate <= 1.0:
      raise ValueError(f"mask_rate={mask_rate} must be in (0, 1]")
    if max_predictions is not None and max_predictions < 1:
      raise ValueError(f"max_predictions={max_predictions} must be >= 1 (or None: no cap)")
    tokenizer.require(mask_id=True, cls_id=True, sep_id=True)
    super().__init__(tokenizer, **loss_options)
    self.tokenizer, self.seq_len, self.mask_rate = tokenizer, seq_len, mask_rate
    self.max_predictions, self.whole_word = max_predictions, whole_word
    self.special_ids = tuple(sorted(tokenizer.special_ids))
    self.lengths = {"tokens": seq_len, "targets": seq_len, "weights": seq_len}

  def examples(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    tok, out = self.tokenizer, []
    for piece in chunks(tokens, self.seq_len - 2):
      row = np.concatenate([[tok.cls_id], piece, [tok.sep_id]]).astype(np.int32)
      inputs, targets, weights = mask_tokens(
          row, seed=int(rng.integers(2**63)), vocab_size=tok.vocab_size, mask_id=tok.mask_id,
          special_ids=self.special_ids, rate=self.mask_rate, max_predictions=self.max_predictions,
          word_starts=tok.word_starts(row) if self.whole_word else None)
      out.append({"tokens": inputs, "targets": targets, "weights": weights})
    return out

  def model_args(self, batch):
    return (batch["tokens"], batch["segment_ids"]), {"positions": batch["positions"]}
