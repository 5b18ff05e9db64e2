"""Tests of packing in llmjax.data.pipeline: fill on real text, no token lost, row invariants.

`builtin_source()` (this Python's standard library) is the variable-length real text.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from llmjax.data import TextSource, builtin_source, fill, make_pipeline
from llmjax.objectives import CausalLM, MaskedLM, PrefixLM, SpanCorruption
from llmjax.objectives.base import chunks
from tests.data.common import OBJECTIVES, SEQ, TOK, segment_spans, take


@pytest.mark.parametrize("objective,key", [("causal_lm", "segment_ids"),
                                           ("masked_lm", "segment_ids"),
                                           ("span_corruption", "encoder_segment_ids")])
def test_packing_fills_rows_of_real_text(objective, key):
  """First-fit packing of variable-length paragraphs fills >= 90% of a batch's positions.

  Padding one example per row fills far less on the same text, which shows the measure bites.
  """
  def mean_fill(packing):
    it = iter(make_pipeline(builtin_source("paragraph"), TOK, OBJECTIVES[objective](256),
                            batch_size=8, seed=0, packing=packing))
    for _ in range(10):  # steady state: past the packer's first, emptier bins
      next(it)
    fills = [fill(next(it), key) for _ in range(50)]
    it.close()
    return float(np.mean(fills))

  assert mean_fill("pack") >= 0.9
  assert mean_fill("pad") < 0.8


@pytest.mark.parametrize("packing", ["pack", "concat", "pad"])
def test_causal_lm_loses_and_duplicates_no_token(long_docs, packing):
  """One epoch of CausalLM rows holds each document's BOS+text+EOS exactly once.

  The weighted targets are every token after the first BOS, the inputs every token before the
  final EOS, and the (input, target) pairs are exactly the documents' consecutive pairs.
  """
  path, lines = long_docs
  batches = take(make_pipeline(TextSource(path), TOK, CausalLM(TOK, SEQ), batch_size=8,
                                seed=5, num_epochs=1, packing=packing))
  want_inputs, want_targets, want_pairs = (collections.Counter() for _ in range(3))
  for line in lines:
    full = [TOK.bos_id] + TOK.encode(line).tolist() + [TOK.eos_id]
    want_inputs.update(full[:-1])
    want_targets.update(full[1:])
    want_pairs.update(zip(full[:-1], full[1:]))
  tokens = np.concatenate([b["tokens"][b["weights"] > 0] for b in batches]).tolist()
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches]).tolist()
  assert collections.Counter(targets) == want_targets
  assert collections.Counter(tokens) == want_inputs
  assert collections.Counter(zip(tokens, targets)) == want_pairs


def test_masked_lm_and_span_corruption_lose_no_token(long_docs):
  """One packed epoch of MaskedLM or SpanCorruption holds every text token of the documents once."""
  path, lines = long_docs
  want = collections.Counter(t for line in lines for t in TOK.encode(line).tolist())
  specials = np.array(sorted(TOK.special_ids))

  batches = take(make_pipeline(TextSource(path), TOK, MaskedLM(TOK, SEQ), batch_size=8,
                                seed=5, num_epochs=1))
  targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
  assert collections.Counter(targets[~np.isin(targets, specials)].tolist()) == want
  num_rows = sum(len(chunks(TOK.encode(line), SEQ - 2)) for line in lines)
  assert np.sum(targets == TOK.cls_id) == np.sum(targets == TOK.sep_id) == num_rows

  batches = take(make_pipeline(TextSource(path), TOK, SpanCorruption(TOK, SEQ), batch_size=8,
                                seed=5, num_epochs=1))
  kept = np.concatenate([b["encoder_tokens"][b["encoder_segment_ids"] > 0] for b in batches]
                        + [b["decoder_targets"][b["decoder_segment_ids"] > 0] for b in batches])
  assert collections.Counter(kept[~np.isin(kept, specials)].tolist()) == want


# --------------------------------------------------------------------------- batch invariants


@pytest.mark.parametrize("packing", ["pack", "concat", "pad"])
def test_causal_lm_targets_never_cross_segments(packing):
  """CausalLM rows: targets are the next input within a segment, positions restart at 0 per
  segment, weights only the segments (not the re-read start of a window that reaches back), BOS
  only starts a segment and EOS is never input."""
  # Rows of 4 * SEQ: documents shorter than a row share one (full windows fill a row alone).
  batches = take(make_pipeline(builtin_source("paragraph"), TOK, CausalLM(TOK, 4 * SEQ),
                                batch_size=8, seed=1, packing=packing), 30)
  segments_per_row = []
  for b in batches:
    seg, pos, tok, tgt = b["segment_ids"], b["positions"], b["tokens"], b["targets"]
    assert (b["weights"] <= (seg > 0)).all()
    same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(tgt[:, :-1][same], tok[:, 1:][same])
    assert not np.any(tok[seg == 0]) and not np.any(tgt[seg == 0]) and not np.any(pos[seg == 0])
    assert np.all(pos[tok == TOK.bos_id] == 0)
    assert not np.any(tok == TOK.eos_id) and not np.any(tgt == TOK.bos_id)
    for row in range(len(seg)):
      spans = segment_spans(seg[row])
      segments_per_row.append(len(spans))
      for s, e in spans:
        np.testing.assert_array_equal(pos[row, s:e], np.arange(e - s))
        if packing != "concat":  # a window: re-read context (weight 0) first, then its targets
          assert (np.diff(b["weights"][row, s:e]) >= 0).all() and b["weights"][row, e - 1] == 1
  if packing == "pad":
    assert set(segments_per_row) == {1}
  else:  # the test saw packed rows with boundaries to cross
    assert max(segments_per_row) > 1


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_prefix_lm_rows(packing):
  """PrefixLM rows: each segment's prefix_mask is a non-empty run of 1s then 0s; prefix positions
  (whose target lies in the prefix) weigh 0; weights are 1 from the last prefix position on."""
  batches = take(make_pipeline(builtin_source("paragraph"), TOK, PrefixLM(TOK, SEQ),
                                batch_size=8, seed=2, packing=packing), 30)
  prefix_lengths = set()
  for b in batches:
    seg, pm, w = b["segment_ids"], b["prefix_mask"], b["weights"]
    assert not np.any(w[seg == 0]) and not np.any(pm[seg == 0])
    same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(b["targets"][:, :-1][same], b["tokens"][:, 1:][same])
    # A position whose target is a prefix token carries no loss.
    assert not np.any(w[:, :-1][same & (pm[:, 1:] == 1)])
    for row in range(len(seg)):
      for s, e in segment_spans(seg[row]):
        n, p = e - s, int(pm[row, s:e].sum())
        assert p >= 1
        np.testing.assert_array_equal(pm[row, s:e], np.arange(n) < p)
        np.testing.assert_array_equal(w[row, s:e], (np.arange(n) >= p - 1).astype(np.float32))
        np.testing.assert_array_equal(b["positions"][row, s:e], np.arange(n))
        prefix_lengths.add(p)
  assert len(prefix_lengths) > 5  # the prefix length is drawn at random


def test_span_corruption_rows():
  """SpanCorruption rows: encoder and decoder hold the same examples under the same segment ids
  (same sentinels in the same order), and decoder_tokens is decoder_targets shifted right
  within each segment behind the start id 0."""
  batches = take(make_pipeline(builtin_source("paragraph"), TOK, SpanCorruption(TOK, 128),
                                batch_size=8, seed=3), 20)
  sentinels = np.array(TOK.sentinel_ids)
  packed = 0
  for b in batches:
    enc_seg, dec_seg = b["encoder_segment_ids"], b["decoder_segment_ids"]
    np.testing.assert_array_equal(b["decoder_weights"], (dec_seg > 0).astype(np.float32))
    for row in range(len(enc_seg)):
      enc_spans, dec_spans = segment_spans(enc_seg[row]), segment_spans(dec_seg[row])
      assert len(enc_spans) == len(dec_spans)
      packed += len(enc_spans) > 1
      for (es, ee), (ds, de) in zip(enc_spans, dec_spans):
        enc, tgt = b["encoder_tokens"][row, es:ee], b["decoder_targets"][row, ds:de]
        dec = b["decoder_tokens"][row, ds:de]
        assert enc[-1] == TOK.eos_id and tgt[-1] == TOK.eos_id
        assert dec[0] == 0
        np.testing.assert_array_equal(dec[1:], tgt[:-1])
        np.testing.assert_array_equal(enc[np.isin(enc, sentinels)], tgt[np.isin(tgt, sentinels)])
        np.testing.assert_array_equal(b["encoder_positions"][row, es:ee], np.arange(ee - es))
        np.testing.assert_array_equal(b["decoder_positions"][row, ds:de], np.arange(de - ds))
      for key in ("encoder_tokens", "decoder_tokens", "decoder_targets"):
        seg = enc_seg if key.startswith("encoder") else dec_seg
        assert not np.any(b[key][row][seg[row] == 0])
  assert packed > 0


def test_masked_lm_rows():
  """MaskedLM rows: loss only on real tokens, never on [CLS]/[SEP]/padding; inputs differ from
  targets only where the loss is; each segment is [CLS] ... [SEP] with at least one prediction."""
  batches = take(make_pipeline(builtin_source("paragraph"), TOK, MaskedLM(TOK, SEQ),
                                batch_size=8, seed=4), 20)
  never = [TOK.cls_id, TOK.sep_id, TOK.pad_id]
  for b in batches:
    seg, w, tok, tgt = b["segment_ids"], b["weights"], b["tokens"], b["targets"]
    chosen = w > 0
    assert np.all(seg[chosen] > 0)
    assert not np.any(np.isin(tgt[chosen], never)) and not np.any(np.isin(tok[chosen], never))
    assert np.all(chosen[tok != tgt])
    assert set(np.unique(w).tolist()) <= {0.0, 1.0}
    for row in range(len(seg)):
      for s, e in segment_spans(seg[row]):
        assert tgt[row, s] == tok[row, s] == TOK.cls_id
        assert tgt[row, e - 1] == tok[row, e - 1] == TOK.sep_id
        assert w[row, s:e].sum() >= 1
        np.testing.assert_array_equal(b["positions"][row, s:e], np.arange(e - s))


# --------------------------------------------------------------------------- order and epochs
