"""Log-probabilities of text under a GPT or T5, batched and sharded: perplexity, log-likelihood.

Every score is a sum of log p(target | inputs) over the weighted targets of padded windows of
at most `context_length` inputs, by the trainer's own cross-entropy (objectives.base), so it
agrees with eval/loss to float rounding. How windows are cut differs between methods:

    stride=S     transformers' strided perplexity: windows of context_length start every S
                 tokens, each scoring the targets no earlier window reached (every token after
                 the first once, with >= context_length - S tokens of context).
    stride=None  lm-evaluation-harness's rolling windows: disjoint runs of context_length
                 targets, each window reaching back a full context_length from its last one,
                 as the trainer's causal LM eval cuts a document (objectives.CausalLM).

Windows are made lazily (a np.memmap corpus works) and scored `batch_size` at a time with one
compiled shape; parameters placed on a mesh run sharded."""

from __future__ import annotations

import functools
import itertools
import math
import re

import jax
import numpy as np

from llmjax import sharding as sh
from llmjax.decode import generation
from llmjax.decode.encoders import check_vocab
from llmjax.models.gpt import GPT
from llmjax.models.t5 import T5
from llmjax.objectives.base import cross_entropy


def _windows(n: int, C: int, stride: int | None):
  """(start, inputs, first target, end target) of each window over a stream of n tokens:
  the window reads tokens [start, start + inputs) and scores the targets [first, end)."""
  if stride is None:
    for first in range(1, n, C):
      end = min(first + C, n)
      start = max(0, end - 1 - C)
      yield start, end - 1 - start, first, end
    return
  reached = 1
  for start in range(0, n, stride):
    end = min(start + C, n)
    yield start, end - start, max(start + 1, reached), end
    reached = end
    if end == n:
      return


def perplexity(model, params, token_ids, *, context_length: int, stride: int | None = None,
               batch_size: int = 8, text: str | None = None) -> dict:
  """The causal LM's negative log-likelihood of a token stream, by windows (see above):
  {"nll": sum in nats, "tokens": number scored, "perplexity", "bits_per_token"}; with the
  stream's `text`, also lm-evaluation-harness's "bits_per_byte", "byte_perplexity" and
  "word_perplexity" (words split on whitespace)."""
  if not isinstance(model, GPT):
    raise ValueError(f"perplexity: needs a causal LM (GPT), got {type(model).__name__}; score a "
                     f"BERT with pseudo_log_likelihood, a T5 with loglikelihood")
  ids = np.asarray(token_ids).reshape(-1)
  check_vocab("perplexity", ids, model.cfg.vocab_size)
  if ids.size < 2:
    raise ValueError(f"perplexity: {ids.size} token(s); at least 2 are needed (a target after "
                     f"the first)")
  cap = model.cfg.max_seq_len if model.cfg.positions == "learned" else None
  if not 1 <= context_length <= (cap or context_length):
    raise ValueError(f"perplexity: context_length={context_length}; expected 1 to the model's "
                     f"{cap} learned positions (GPTConfig.max_seq_len)")
  if stride is not None and not 1 <= stride <= context_length:
    raise ValueError(f"perplexity: stride={stride}; expected 1 <= stride <= context_length="
                     f"{context_length} (or None for rolling windows)")
  if stride is not None and context_length < 2:
    raise ValueError("perplexity: strided windows need context_length >= 2")
  def rows():  # made as they are scored: a stream of any length costs one batch of memory
    for start, inputs, first, end in _windows(ids.size, context_length, stride):
      w = np.zeros(inputs, np.float32)
      w[first - start - 1:end - start - 1] = 1.0
      yield ids[start:start + inputs], ids[start + 1:start + inputs + 1], w
  sums = score_rows(model, params, rows(), batch_size, width=context_length)
  nll, tokens = -float(sum(s[0] for s in sums)), int(sum(s[2] for s in sums))
  r = {"nll": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens),
       "bits_per_token": nll / tokens / math.log(2)}
  if text is not None:
    num_bytes, words = len(text.encode("utf-8")), len(re.split(r"\s+", text))
    r.update(bits_per_byte=nll / num_bytes / math.log(2), byte_perplexity=math.exp(nll / num_bytes),
             word_perplexity=math.exp(nll / words))
  return r


def loglikelihood(model, params, requests, *, batch_size: int = 16) -> list[tuple[float, bool]]:
  """[(log p(continuation | context), whether it is the greedy one)] of each request
  (context_ids, continuation_ids), in order. GPT: the two concatenated, cut from the left to
  max_seq_len + 1 tokens (lm-evaluation-harness's HFLM); T5: the context is the encoder input,
  the continuation the decoder targets after start token 0. Batched longest first."""
  if not isinstance(model, (GPT, T5)):
    raise ValueError(f"loglikelihood: needs a GPT or T5, got {type(model).__name__}")
  pairs = []
  for i, (context, continuation) in enumerate(requests):
    context, continuation = (np.asarray(x, np.int64).reshape(-1) for x in (context, continuation))
    if not continuation.size or not context.size:
      raise ValueError(f"loglikelihood: request {i} has an empty "
                       f"{'continuation' if not continuation.size else 'context'}; each needs "
                       f"at least one token (prepend BOS/EOS to an empty context)")
    check_vocab(f"loglikelihood: request {i}", np.concatenate([context, continuation]),
                model.cfg.vocab_size)
    pairs.append((context, continuation))
  if isinstance(model, T5):
    rows = [(c, np.concatenate([[0], t[:-1]]), t, np.ones(t.size, np.float32)) for c, t in pairs]
  else:
    L = model.cfg.max_seq_len
    rows = []
    for i, (c, t) in enumerate(pairs):
      if t.size > L:
        raise ValueError(f"loglikelihood: request {i}'s continuation has {t.size} tokens, more "
                         f"than the model's max_seq_len={L}")
      whole = np.concatenate([c, t])[-(L + 1):]
      rows.append((whole[:-1], whole[1:], (np.arange(whole.size - 1) >= whole.size - 1 - t.size)
                   .astype(np.float32)))
  order = sorted(range(len(rows)), key=lambda i: -max(len(x) for x in rows[i]))
  results = [None] * len(rows)
  for i, (lp, correct, weight) in zip(order, score_rows(model, params, [rows[i] for i in order],
                                                         batch_size)):
    results[i] = (float(lp), bool(correct == weight))
  return results


def score_rows(model, params, rows, batch_size: int, width: int | None = None):
  """(summed log-probability, greedy targets, targets) of each of `rows` (an iterable), weighted,
  in order. A row is (inputs, targets, weights) for a GPT or BERT, (encoder inputs, decoder
  inputs, targets, weights) for a T5; padded to `width`, else to a bucket of its batch's longest."""
  out, pending, rows = [], [], iter(rows)
  while chunk := list(itertools.islice(rows, batch_size)):
    T = width or generation.bucket(max(len(x) for row in chunk for x in row),
                                   getattr(model.cfg, "max_seq_len", None))
    n = len(chunk[0])  # the row's arrays, then the segment ids of its n - 2 model inputs
    arrays = [np.zeros((batch_size, T), np.float32 if k == n - 1 else np.int32)
              for k in range(2 * n - 2)]
    for r, row in enumerate(chunk):
      for k, x in enumerate(row):
        arrays[k][r, :len(x)] = x
        if k < n - 2:
          arrays[n + k][r, :len(x)] = 1
    pending.append((len(chunk), generation.run_on_mesh_of(_scorer(model), params, tuple(arrays))))
    if len(pending) > 2:  # the host makes batch b + 2 while b runs
      m, sums = pending.pop(0)
      out.extend(zip(*(np.asarray(x)[:m] for x in sums)))
  for m, sums in pending:
    out.extend(zip(*(np.asarray(x)[:m] for x in sums)))
  return out


@functools.lru_cache(maxsize=16)
def _scorer(model):
  @jax.jit
  def run(params, *arrays):
    if isinstance(model, T5):
      enc_BS, dec_BT, targets_BT, weights_BT, enc_seg_BS, dec_seg_BT = arrays
      logits_BTV = model.apply({"params": params}, enc_BS, dec_BT, enc_seg_BS, dec_seg_BT)
    else:
      tokens_BT, targets_BT, weights_BT, seg_BT = arrays
      logits_BTV = model.apply({"params": params}, tokens_BT, seg_BT)
    sums = cross_entropy(logits_BTV, targets_BT, weights_BT, axis=-1)  # per row
    # Replicated on a mesh: every process of a pod can read its [B] sums.
    return tuple(sh.constrain(x, (None,)) for x in (-sums["nll"], sums["correct"], sums["weight"]))
  return run
