"""Tests of llmjax.data.sources.split_source: deterministic train/validation splits of any
source."""

import json

import numpy as np
import pytest

from llmjax.data.sources import ArrayRecordSource, JsonlSource, TextSource, split_source
from tests.data.sources_test import _concat, _docs, _random_text, _write, _write_shard


def _text_source(tmp_path, num_lines=400, seed=0):
  rng = np.random.default_rng(seed)
  return TextSource(_write(tmp_path / f"corpus{seed}.txt", _random_text(rng, num_lines)), "line")


def _check_tail_split(source, fraction):
  """The invariants of a tail split: exact cover, validation last, share close to fraction."""
  train, val = split_source(source, fraction, method="tail")
  train_docs, val_docs = _docs(train), _docs(val)
  all_docs = _docs(source)
  whole = _concat(all_docs)
  if isinstance(whole, str):
    assert _concat(train_docs) + _concat(val_docs) == whole
    total, val_size = len(whole.encode("utf-8")), len(_concat(val_docs).encode("utf-8"))
  else:
    np.testing.assert_array_equal(np.concatenate([_concat(train_docs), _concat(val_docs)]), whole)
    total, val_size = len(whole), len(_concat(val_docs))
  # The cut moves back at most 3 bytes, to a character boundary; rounding adds half a unit.
  assert abs(val_size - fraction * total) <= 3.5, (val_size, fraction * total)
  assert 0 < val_size < total
  # Train holds a prefix of the documents, validation the rest: at most one document is shared.
  np.testing.assert_array_equal(train.indices, np.arange(len(train)))
  np.testing.assert_array_equal(val.indices, np.arange(len(source) - len(val), len(source)))
  assert len(train) + len(val) in (len(source), len(source) + 1)
  np.testing.assert_array_equal(train.sizes, [len(d.encode() if isinstance(d, str) else d)
                                              for d in train_docs])
  return train, val


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_tail_split_covers_the_corpus(tmp_path, fraction):
  """Train then validation is the corpus exactly; validation is its last `fraction` of bytes."""
  _check_tail_split(_text_source(tmp_path), fraction)


def test_tail_split_between_documents(tmp_path):
  """A boundary on a document edge cuts nothing: whole documents on either side."""
  path = _write(tmp_path / "t.txt", "".join(f"doc number{k}\n" for k in range(10)))  # 11 bytes each
  source = TextSource(path)
  train, val = split_source(source, 0.3)
  assert _docs(train) == _docs(source)[:7] and _docs(val) == _docs(source)[7:]


@pytest.mark.parametrize("char", ["é", "日", "🦊"])
def test_tail_split_of_one_document(tmp_path, char):
  """A one-document corpus is cut inside it, on a character boundary, at every fraction."""
  text = "ab " + char * 40 + " cd" + char
  source = TextSource(_write(tmp_path / "one.txt", text), split="file")
  assert len(source) == 1
  for fraction in np.linspace(0.02, 0.98, 37):
    train, val = _check_tail_split(source, float(fraction))
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == text


def test_tail_split_cuts_token_documents(tmp_path):
  """Token shards split by tokens, the boundary document cut between its two halves."""
  arrays = [np.arange(k * 100, k * 100 + n, dtype=np.int32) for k, n in enumerate((7, 13, 5, 11))]
  _write_shard(tmp_path / "s.array_record", [x.tobytes() for x in arrays])
  _write(tmp_path / "meta.json", json.dumps({"tokenizer": "byte", "dtype": "int32"}))
  source = ArrayRecordSource(str(tmp_path))
  for fraction in (0.1, 0.25, 0.5, 0.77):
    train, val = _check_tail_split(source, fraction)
    assert train.tokenizer == val.tokenizer == "byte"


def test_tail_split_of_jsonl(tmp_path):
  """JSONL documents split like text, by bytes of their values."""
  values = [f"record {k} " + "é" * k for k in range(30)]
  path = _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": v}) + "\n" for v in values))
  _check_tail_split(JsonlSource(path), 0.2)


@pytest.mark.parametrize("method", ["tail", "hash"])
def test_split_is_deterministic(tmp_path, method):
  """The same source, fraction and seed give the same split twice, on a fresh source too."""
  a_train, a_val = split_source(_text_source(tmp_path), 0.2, method=method, seed=3)
  b_train, b_val = split_source(_text_source(tmp_path), 0.2, method=method, seed=3)
  assert _docs(a_train) == _docs(b_train) and _docs(a_val) == _docs(b_val)
  np.testing.assert_array_equal(a_val.indices, b_val.indices)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_hash_split_partitions_documents(tmp_path, fraction):
  """Hash: train and validation split the indices, hold the source's documents unchanged."""
  source = _text_source(tmp_path, num_lines=3000)
  n = len(source)
  train, val = split_source(source, fraction, method="hash", seed=7)
  assert not set(train.indices.tolist()) & set(val.indices.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([train.indices, val.indices])),
                                np.arange(n))
  assert _docs(train) == [source[i] for i in train.indices]
  assert _docs(val) == [source[i] for i in val.indices]
  assert abs(len(val) / n - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / n)


def test_hash_split_depends_on_index_alone(tmp_path):
  """Appending documents keeps every earlier document's side; another seed changes sides."""
  small = _text_source(tmp_path, num_lines=500, seed=0)
  extra = _write(tmp_path / "more.txt", _random_text(np.random.default_rng(9), 500))
  large = TextSource([small.paths[0], extra])
  n = len(small)
  assert len(large) > n
  _, val_small = split_source(small, 0.25, method="hash", seed=11)
  _, val_large = split_source(large, 0.25, method="hash", seed=11)
  np.testing.assert_array_equal(val_large.indices[val_large.indices < n], val_small.indices)
  _, val_other = split_source(small, 0.25, method="hash", seed=12)
  assert not np.array_equal(val_other.indices, val_small.indices)


def test_split_rejects_bad_arguments(tmp_path):
  """Fractions outside (0, 1), unknown methods and too few documents for hash are errors."""
  source = _text_source(tmp_path)
  for fraction in (0.0, 1.0, -0.1, 1.5):
    for method in ("tail", "hash"):
      with pytest.raises(ValueError, match="validation_fraction"):
        split_source(source, fraction, method=method)
  with pytest.raises(ValueError, match="method"):
    split_source(source, 0.1, method="random")
  one = TextSource(_write(tmp_path / "one.txt", "a single line\n"))
  for seed in range(5):
    with pytest.raises(ValueError):
      split_source(one, 0.5, method="hash", seed=seed)
