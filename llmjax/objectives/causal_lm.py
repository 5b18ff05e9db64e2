"""Causal LM (GPT) and prefix LM (T5 section 3.2.1, UL2's S-denoiser): next-token prediction.

A document becomes BOS + tokens + EOS, cut into windows of `seq_len + 1` tokens that overlap
by one (tokens w[:-1], targets w[1:]), so every token after BOS is a target exactly once and
no target crosses into the next packed document. A short last window reaches back to full
length, its re-read targets weighted 0 (lm-evaluation-harness's rolling windows): its targets
see as much context as the others, and eval/loss is evaluation.perplexity's.

Prefix LM splits each window at a random point: the prefix is seen bidirectionally
(`prefix_mask`, over input positions) and only the suffix is predicted. The position whose
input is the prefix's last token predicts the suffix's first token, so its weight is 1; the
positions whose targets lie inside the prefix have weight 0.
"""

from __future__ import annotations

import copy

import numpy as np

from llmjax.objectives.base import Objective, chunks


class CausalLM(Objective):
  """Next-token prediction on decoder-only models; loss on every real token."""

  splittable = True  # a window cut in two is two shorter windows

  def __init__(self, tokenizer, seq_len: int, *, add_bos: bool = True, add_eos: bool = True,
               random_offset: bool = False, **loss_options):
    """`random_offset`: the windows of a document start at a random offset (a shorter first
    window before it), drawn anew each epoch: a long text is seen in ever new windows, as
    nanoGPT's random crops see it, and every token is still a target once per pass."""
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be at least 1 for causal LM")
    if add_bos or add_eos:
      tokenizer.require(bos_id=add_bos, eos_id=add_eos)
    super().__init__(tokenizer, **loss_options)
    self.seq_len, self.random_offset = seq_len, random_offset
    self.bos = [tokenizer.bos_id] if add_bos else []
    self.eos = [tokenizer.eos_id] if add_eos else []
    self.lengths = {"tokens": seq_len, "targets": seq_len, "weights": seq_len}

  def windows(self, tokens: np.ndarray, offset: int = 0) -> list[np.ndarray]:
    """Windows of seq_len + 1 tokens that overlap by one, the first `offset` + 1 long."""
    full = np.concatenate([self.bos, tokens, self.eos]).astype(np.int32)
    head = [full[:offset + 1]] if 0 < offset < len(full) - 1 else []
    rest = full[offset:] if head else full
    return [w for w in head + chunks(rest, self.seq_len + 1, overlap=1) if len(w) >= 2]

  def examples(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    offset = int(rng.integers(self.seq_len)) if self.random_offset else 0
    windows = self.windows(tokens, offset)
    out = [{"tokens": w[:-1], "targets": w[1:], "weights": np.ones(len(w) - 1, np.float32)}
           for w in windows]
    full = np.concatenate([self.bos, tokens, self.eos]).astype(np.int32)
    scored = len(windows[-1]) - 1 if windows else 0
    if len(windows) > 1 and scored < self.seq_len:
      w = full[-(self.seq_len + 1):]
      out[-1] = {"tokens": w[:-1], "targets": w[1:],
                 "weights": (np.arange(len(w) - 1) >= len(w) - 1 - scored).astype(np.float32)}
    return out

  def for_eval(self) -> CausalLM:
    """Eval reads each document in windows from its start (no random offset)."""
    if not self.random_offset:
      return self
    evaluated = copy.copy(self)
    evaluated.random_offset = False
    return evaluated

  def model_args(self, batch):
    return (batch["tokens"], batch["segment_ids"], batch["positions"]), {}


class PrefixLM(CausalLM):
  """Decoder-only with a bidirectional prefix of uniformly random length; loss on the suffix."""

  splittable = False  # a cut would leave a suffix without its prefix

  def __init__(self, tokenizer, seq_len: int, *, add_bos: bool = True, add_eos: bool = True,
               **loss_options):
    if seq_len < 2:
      raise ValueError(f"seq_len={seq_len} is too short for prefix LM: a window needs a prefix "
                       f"token and a target")
    super().__init__(tokenizer, seq_len, add_bos=add_bos, add_eos=add_eos, **loss_options)
    self.lengths = {"tokens": seq_len, "targets": seq_len, "weights": seq_len,
                    "prefix_mask": seq_len}

  def examples(self, tokens: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    out = []
    for w in self.windows(tokens):
      n = len(w) - 1
      # Prefix of p >= 1 input tokens; with n == 1 the lone target is the suffix.
      p = int(rng.integers(1, n)) if n > 1 else 1
      index = np.arange(n)
      out.append({"tokens": w[:-1], "targets": w[1:],
                  "weights": (index >= p - 1).astype(np.float32),
                  "prefix_mask": (index < p).astype(np.int32)})
    return out

  def batch(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**super().batch(rows), "prefix_mask": rows["prefix_mask"]}

  def model_args(self, batch):
    return (batch["tokens"], batch["segment_ids"], batch["positions"]), {
        "prefix_mask": batch["prefix_mask"]}
