"""Tests of llmjax.data.pipeline: exact resume, determinism, epochs, workers, bad input.

Documents come from files written into tmp_path (unique lines of random length, so every
document can be recognized in a batch). Packing and per-objective row invariants are in
packing_test.py.
"""

from __future__ import annotations

import copy

import grain
import numpy as np
import pytest

from llmjax.data import ByteTokenizer, TextSource, is_padding, make_pipeline, padding_batch
from llmjax.objectives import CausalLM, MaskedLM, PrefixLM, SpanCorruption
from tests.data.common import (OBJECTIVES, SEQ, TOK, assert_batches_equal, documents,
                               segment_spans, take)

# (objective, packing) pairs the pipeline supports: concat is for causal LM only.
RESUME_CASES = ([(name, "pack") for name in OBJECTIVES] + [(name, "pad") for name in OBJECTIVES]
                + [("causal_lm", "concat")])


# --------------------------------------------------------------------------- resume


def _check_resume(make, stop: int = 13, n: int = 100) -> None:
  """Batches stop..stop+n of `make()` equal those of a new pipeline given the state at `stop`."""
  reference = take(make(), stop + n)
  it = iter(make())
  for _ in range(stop):
    next(it)
  state = copy.deepcopy(it.get_state())
  it.close()
  resumed = iter(make())  # everything rebuilt: source, tokenizer, objective, pipeline
  resumed.set_state(state)
  batches = [next(resumed) for _ in range(n)]
  resumed.close()
  assert_batches_equal(reference[stop:], batches)


@pytest.mark.parametrize("objective,packing", RESUME_CASES)
def test_resume_mid_epoch_is_exact(small_corpus, objective, packing):
  """A pipeline restored from get_state() mid-epoch (mid-document) gives the next 100 batches.

  100 batches pass through the 40-document corpus several times, so the resumed run also
  crosses epoch boundaries (reshuffles) and matches there.
  """
  def make():
    return make_pipeline(TextSource(small_corpus), ByteTokenizer(), OBJECTIVES[objective](SEQ),
                         batch_size=4, seed=7, packing=packing)
  _check_resume(make)


@pytest.mark.parametrize("shard_index", [0, 1])
def test_resume_each_of_two_shards_is_exact(small_corpus, shard_index):
  """With two simulated processes, each one's shard resumes exactly from its own state."""
  def make():
    return make_pipeline(TextSource(small_corpus), ByteTokenizer(), CausalLM(TOK, SEQ),
                         batch_size=4, seed=7, shard_index=shard_index, shard_count=2)
  _check_resume(make, stop=9)


def test_resume_through_orbax(small_corpus, tmp_path):
  """Saved by Orbax (grain.checkpoint.CheckpointSave) and restored into a new pipeline: exact."""
  import orbax.checkpoint as ocp

  def make():
    return make_pipeline(TextSource(small_corpus), ByteTokenizer(), SpanCorruption(TOK, SEQ),
                         batch_size=4, seed=11)
  stop, n = 17, 100
  reference = take(make(), stop + n)
  it = iter(make())
  for _ in range(stop):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(stop, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  mngr.close()
  it.close()

  restored = iter(make())
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  assert mngr.latest_step() == stop
  mngr.restore(stop, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  mngr.close()
  batches = [next(restored) for _ in range(n)]
  restored.close()
  assert_batches_equal(reference[stop:], batches)


def _until_padding(it, limit=10_000):
  """The batches of `it` before its first all-padding batch."""
  out = []
  for _ in range(limit):
    batch = next(it)
    if is_padding(batch):
      return out
    out.append(batch)
  raise AssertionError("no padding batch after the data")


def test_two_shards_read_disjoint_documents(short_docs):
  """Two processes each read half of the documents in an epoch: disjoint, together all of them."""
  path, lines = short_docs
  seen = []
  for shard_index in (0, 1):
    it = iter(make_pipeline(TextSource(path), TOK, CausalLM(TOK, SEQ), batch_size=8, seed=3,
                            num_epochs=1, shard_index=shard_index, shard_count=2))
    docs = documents(_until_padding(it))
    it.close()
    assert len(docs) == len(set(docs)) == len(lines) // 2
    seen.append(set(docs))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(lines)


def test_processes_keep_stepping_in_lockstep_after_their_data(long_docs):
  """With a finite epoch, a process whose shard ends first yields padding batches, forever and
  on resume too, so a multi-host step never waits on a process that stopped."""
  path, _ = long_docs
  make = lambda i: make_pipeline(TextSource(path), TOK, SpanCorruption(TOK, SEQ), batch_size=4,
                                 seed=0, num_epochs=1, shard_index=i, shard_count=3)
  iters = [iter(make(i)) for i in range(3)]
  counts = [len(_until_padding(it)) for it in iters]
  assert len(set(counts)) > 1, counts  # uneven shards: the case that would hang
  padding = padding_batch(SpanCorruption(TOK, SEQ), 4)
  for it in iters:
    state = it.get_state()
    for _ in range(3):
      assert_batches_equal([next(it)], [padding])
    resumed = iter(make(0 if it is iters[0] else 1 if it is iters[1] else 2))
    resumed.set_state(state)
    assert is_padding(next(resumed))
    resumed.close()
    it.close()
  # Asked not to pad, the pipeline just ends.
  single = make_pipeline(TextSource(path), TOK, CausalLM(TOK, SEQ), batch_size=4, num_epochs=1,
                         shard_index=0, shard_count=3, pad_after_end=False)
  assert not any(is_padding(b) for b in take(single))


@pytest.mark.parametrize("change", [{"batch_size": 8}, {"seed": 1}, {"shard_count": 1},
                                    {"packing": "pad"}])
def test_state_from_other_arguments_is_refused(small_corpus, change):
  """Restoring a state saved under other pipeline arguments names them instead of silently
  skipping or repeating data."""
  args = dict(batch_size=4, seed=0, shard_index=0, shard_count=2, packing="pack")
  it = iter(make_pipeline(TextSource(small_corpus), TOK, CausalLM(TOK, SEQ), **args))
  next(it)
  state = it.get_state()
  it.close()
  other = iter(make_pipeline(TextSource(small_corpus), TOK, CausalLM(TOK, SEQ),
                             **{**args, **change}))
  with pytest.raises(ValueError, match=next(iter(change))):
    other.set_state(state)
  other.close()


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_same_seed_same_batches_other_seed_other_batches(small_corpus, objective):
  """Two pipelines with one seed give identical batches; another seed gives different ones."""
  def batches(seed):
    return take(make_pipeline(TextSource(small_corpus), TOK, OBJECTIVES[objective](SEQ),
                               batch_size=4, seed=seed), 10)
  first = batches(3)
  assert_batches_equal(first, batches(3))
  key = "encoder_tokens" if objective == "span_corruption" else "tokens"
  assert not np.array_equal(np.stack([b[key] for b in first]),
                            np.stack([b[key] for b in batches(4)]))


def test_other_seed_other_document_order(short_docs):
  """The seed drives the document order; without shuffle the order is the source's."""
  path, lines = short_docs
  def order(**kwargs):
    return documents(take(make_pipeline(TextSource(path), TOK, CausalLM(TOK, SEQ),
                                          batch_size=8, num_epochs=1, packing="pad", **kwargs)))
  a, b = order(seed=0), order(seed=1)
  assert sorted(a) == sorted(b) == sorted(lines)
  assert a != b and a != lines
  assert order(seed=0, shuffle=False) == lines


def test_epochs_reshuffle_and_hold_each_document_once(short_docs):
  """With num_epochs=2 each epoch is a permutation of all documents, the second a new one."""
  path, lines = short_docs
  docs = documents(take(make_pipeline(TextSource(path), TOK, CausalLM(TOK, SEQ),
                                        batch_size=8, seed=0, num_epochs=2, packing="pad")))
  assert len(docs) == 2 * len(lines)
  first, second = docs[:len(lines)], docs[len(lines):]
  assert sorted(first) == sorted(second) == sorted(lines)
  assert first != second


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_short_final_batch_is_filled_with_empty_rows(short_docs, objective):
  """200 one-row documents in batches of 16: 13 batches of 16 rows, the last with 8 empty ones."""
  path, lines = short_docs
  obj = OBJECTIVES[objective](SEQ)
  batches = take(make_pipeline(TextSource(path), TOK, obj, batch_size=16, seed=0,
                                num_epochs=1, packing="pad"))
  assert len(batches) == 13
  seg_keys = [k for k in batches[0] if k.endswith("segment_ids")]
  for b in batches:
    assert b.keys() == batches[0].keys()
    for k, v in b.items():
      assert v.shape == batches[0][k].shape and v.shape[0] == 16, k
  last = batches[-1]
  for k in seg_keys:
    assert np.all(np.any(last[k][:8] > 0, axis=1)), k
  for k, v in last.items():
    assert not np.any(v[8:]), f"{k} of an empty row is not zero"
  weights = last["decoder_weights" if objective == "span_corruption" else "weights"]
  assert weights[:8].sum() > 0


def test_examples_per_batch_counts_examples_and_drops_none(short_docs):
  """examples_per_batch=6 in 6 rows (each fits any short document): every batch holds 6
  examples (the last the rest), packed into valid rows, and the epoch holds every document
  exactly once."""
  path, lines = short_docs
  batches = take(make_pipeline(TextSource(path), TOK, CausalLM(TOK, SEQ), batch_size=6, seed=0,
                               num_epochs=1, examples_per_batch=6))
  counts = [sum(len(segment_spans(row)) for row in b["segment_ids"]) for b in batches]
  assert all(b["tokens"].shape == (6, SEQ) for b in batches)
  assert counts == [6] * 33 + [2], counts
  assert max(np.max(b["segment_ids"]) for b in batches) > 1  # rows hold several
  assert sorted(documents(batches)) == sorted(lines)


def test_examples_per_batch_carries_what_does_not_fit(short_docs):
  """Examples that cannot all fit one batch wait for the next: batches hold at most the count,
  the rows are valid, and each of the epoch's examples arrives once."""
  path, _ = short_docs
  def make(**kw):
    return make_pipeline(TextSource(path), TOK, MaskedLM(TOK, SEQ), batch_size=2, seed=3,
                         num_epochs=1, shuffle=False, **kw)
  counted = take(make(examples_per_batch=4))
  counts = [sum(len(segment_spans(row)) for row in b["segment_ids"]) for b in counted]
  assert max(counts) == 4 and min(counts[:-1]) < 4, counts
  padded = take(make(packing="pad"))
  rows = lambda batches: sorted(
      bytes(b["tokens"][r, s:e]) for b in batches for r in range(len(b["tokens"]))
      for s, e in segment_spans(b["segment_ids"][r]))
  assert rows(counted) == rows(padded)


def test_examples_per_batch_resumes_exactly(long_docs):
  """With examples waiting to be batched, a restored pipeline gives the same next batches."""
  path, _ = long_docs
  _check_resume(lambda: make_pipeline(TextSource(path), TOK, MaskedLM(TOK, SEQ), batch_size=2,
                                      seed=5, examples_per_batch=6), stop=7, n=20)


# --------------------------------------------------------------------------- workers


def test_worker_process_gives_the_same_batches(short_docs):
  """worker_count=1 (a separate process via mp_prefetch) gives the batches of worker_count=0."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  path, _ = short_docs
  def batches(workers):
    return take(make_pipeline(TextSource(path), TOK, MaskedLM(TOK, SEQ), batch_size=4, seed=2,
                               worker_count=workers), 6)
  assert_batches_equal(batches(0), batches(1))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(packing="packed"), "packing"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-2), "batch_size"),
    (dict(objective="span_corruption", packing="concat"), "concat"),
    (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(shard_index=-1, shard_count=2), "shard_index"),
    (dict(packing="pad", examples_per_batch=8), "examples_per_batch"),
    (dict(examples_per_batch=0), "examples_per_batch"),
])
def test_bad_arguments_raise_before_reading(short_docs, kwargs, match):
  """Wrong arguments raise ValueError from make_pipeline itself, before any document is read."""
  path, _ = short_docs
  source = TextSource(path)
  reads = []
  class Watched:
    def __len__(self):
      return len(source)
    def __getitem__(self, i):
      reads.append(i)
      return source[i]
  kwargs = {"batch_size": 4, **kwargs}
  objective = OBJECTIVES[kwargs.pop("objective", "causal_lm")](SEQ)
  with pytest.raises(ValueError, match=match):
    make_pipeline(Watched(), TOK, objective, **kwargs)
  assert not reads


def test_more_processes_than_documents_raises(tmp_path):
  """A source with fewer documents than processes is refused rather than leaving a process idle."""
  (tmp_path / "two.txt").write_text("one document\nanother one\n")
  source = TextSource(str(tmp_path / "two.txt"))
  with pytest.raises(ValueError, match="fewer than"):
    make_pipeline(source, TOK, CausalLM(TOK, SEQ), batch_size=1, shard_index=0, shard_count=3)
  make_pipeline(source, TOK, CausalLM(TOK, SEQ), batch_size=1, shard_index=1, shard_count=2)


@pytest.mark.parametrize("make", [lambda: CausalLM(TOK, 0), lambda: CausalLM(TOK, -1),
                                  lambda: PrefixLM(TOK, 1), lambda: MaskedLM(TOK, 2),
                                  lambda: SpanCorruption(TOK, 1), lambda: SpanCorruption(TOK, 2),
                                  lambda: SpanCorruption(TOK, 9)])
def test_too_short_sequence_lengths_raise(make):
  """An objective whose rows cannot hold an example is refused when it is made."""
  with pytest.raises(ValueError):
    make()


@pytest.mark.parametrize("objective,length", [("causal_lm", 1), ("prefix_lm", 2),
                                              ("masked_lm", 3), ("span_corruption", 10)])
def test_shortest_accepted_lengths_work(short_docs, objective, length):
  """The shortest sequence length each objective accepts still makes full, resumable batches."""
  path, _ = short_docs
  def make():
    return make_pipeline(TextSource(path), TOK, OBJECTIVES[objective](length), batch_size=2,
                         seed=0)
  batches = take(make(), 5)
  for b in batches:
    seg = b["encoder_segment_ids" if objective == "span_corruption" else "segment_ids"]
    assert seg.shape == (2, length)
    # Every row holds an example; span corruption's short chunks need not fill theirs.
    assert np.all(seg[:, 0] > 0) if objective == "span_corruption" else np.all(seg > 0)
  _check_resume(make, stop=3, n=5)
