"""Document sources: what each split reads, bad input, split_source's invariants and pickling."""

import json
import logging as pylogging
import pickle
import re

import numpy as np
import pytest
from array_record.python import array_record_module as ar

from llmjax.data import sources
from llmjax.data.sources import ArrayRecordSource, JsonlSource, TextSource, split_source

_BLANK = " \t\n\r\v\f"  # what the sources count as whitespace (ASCII only)
_WORDS = ("alpha", "beta", "gamma", "naïve", "日本語", "🦊", "x", "Ωmega", "tab\tbed", "q")


def _write(path, content):
  with open(path, "wb") as f:
    f.write(content.encode("utf-8") if isinstance(content, str) else content)
  return str(path)


def _is_blank(line):
  return not line.strip(_BLANK)


def _lines(text):
  """Non-blank lines; a CRLF line end leaves no "\\r" behind."""
  return [line.removesuffix("\r") for line in text.split("\n") if not _is_blank(line)]


def _paragraphs(text):
  paragraphs, current = [], []
  for line in text.split("\n") + [""]:
    if _is_blank(line):
      if current:
        paragraphs.append("\n".join(current).removesuffix("\r"))
      current = []
    else:
      current.append(line)
  return paragraphs


def _files(text):
  return [] if _is_blank(text) else [text]


def _chunks(text):
  from tests.data.char_chunk_test import _reference_chunks
  return _reference_chunks(text.encode("utf-8"))


_REFERENCE = {"line": _lines, "paragraph": _paragraphs, "file": _files, "chunk": _chunks}


def _random_text(rng, num_lines):
  """Lines of words, blank lines, whitespace-only lines, CRLF endings, maybe no final newline."""
  lines = []
  for _ in range(num_lines):
    kind = rng.integers(6)
    if kind == 0:
      lines.append("")
    elif kind == 1:
      lines.append(str(rng.choice([" ", "\t", "  \t ", "\r", "\v\f"])))
    else:
      words = rng.choice(_WORDS, size=rng.integers(1, 6))
      line = " ".join(words)
      lines.append(("  " if kind == 2 else "") + line + ("\r" if kind == 3 else ""))
  return "\n".join(lines) + ("\n" if rng.integers(2) else "")


def _docs(source):
  return [source[i] for i in range(len(source))]


def _concat(docs):
  if docs and not isinstance(docs[0], str):
    return np.concatenate(docs)
  return "".join(docs)


def _write_shard(path, records):
  writer = ar.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= pylogging.WARNING]


# TextSource: what each split reads.


@pytest.mark.parametrize("split", sources.SPLITS)
def test_text_documents_match_reference(tmp_path, split):
  """Documents: the non-blank lines / paragraphs / files, in sorted file order; sizes in bytes."""
  rng = np.random.default_rng(0)
  texts = {name: _random_text(rng, 60) for name in ("c.txt", "a.txt", "b.txt")}
  texts["empty.txt"] = ""  # an empty file among non-empty ones adds nothing
  for name, text in texts.items():
    _write(tmp_path / name, text)
  source = TextSource(str(tmp_path / "*.txt"), split=split)
  expected = [d for name in sorted(texts) for d in _REFERENCE[split](texts[name])]
  assert source.paths == [str(tmp_path / name) for name in sorted(texts)]
  assert len(source) == len(expected) > 0
  assert _docs(source) == expected
  np.testing.assert_array_equal(source.sizes, [len(d.encode("utf-8")) for d in expected])


def test_text_splits_on_a_small_file(tmp_path):
  """The three splits of one hand-written file, blank and whitespace-only lines included."""
  path = _write(tmp_path / "t.txt", "first line\n  indented\n\n \t \nsecond para\nits end\n\n\n")
  assert _docs(TextSource(path, split="line")) == ["first line", "  indented", "second para",
                                                    "its end"]
  assert _docs(TextSource(path, split="paragraph")) == ["first line\n  indented",
                                                         "second para\nits end"]
  with open(path, encoding="utf-8") as f:
    assert _docs(TextSource(path, split="file")) == [f.read()]


def test_text_pattern_lists_keep_pattern_order(tmp_path):
  """Comma-separated patterns are read in the order given, each glob's matches sorted."""
  for name in ("a1.txt", "a2.txt", "b1.txt", "b2.txt", "c.txt"):
    _write(tmp_path / name, f"{name}\n")
  d = str(tmp_path)
  source = TextSource(f"{d}/c.txt,{d}/b*.txt,{d}/a2.txt,{d}/a1.txt", split="file")
  assert _docs(source) == ["c.txt\n", "b1.txt\n", "b2.txt\n", "a2.txt\n", "a1.txt\n"]
  as_list = TextSource([f"{d}/c.txt", f"{d}/b*.txt"], split="line")
  assert _docs(as_list) == ["c.txt", "b1.txt", "b2.txt"]


def test_text_multibyte_round_trip(tmp_path):
  """UTF-8 text of 2-, 3- and 4-byte characters reads back exactly; sizes count bytes."""
  text = "naïve café\n日本語のテキスト\n\n🦊🎉 emoji\nÅngström ∑ ≠ ∞\n"
  path = _write(tmp_path / "u.txt", text)
  source = TextSource(path, split="line")
  assert _docs(source) == ["naïve café", "日本語のテキスト", "🦊🎉 emoji", "Ångström ∑ ≠ ∞"]
  np.testing.assert_array_equal(source.sizes, [12, 24, 14, 22])
  assert _docs(TextSource(path, split="file")) == [text]


# Bad input.


def test_missing_file_names_the_path(tmp_path):
  """A missing file, alone or in a list, is a FileNotFoundError naming it."""
  good = _write(tmp_path / "good.txt", "text\n")
  missing = str(tmp_path / "missing.txt")
  for patterns in (missing, f"{good},{missing}"):
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
      TextSource(patterns)
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    JsonlSource(missing)
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    ArrayRecordSource(missing)


def test_glob_matching_nothing_names_the_pattern(tmp_path):
  """A glob that matches no file is a FileNotFoundError naming the pattern."""
  _write(tmp_path / "a.txt", "text\n")
  pattern = str(tmp_path / "nothing-*.txt")
  with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
    TextSource(pattern)
  with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
    TextSource(f"{tmp_path / 'a.txt'},{pattern}")


def test_directory_is_a_value_error(tmp_path):
  """A directory is not a text file: ValueError naming it."""
  _write(tmp_path / "a.txt", "text\n")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    TextSource(str(tmp_path))
  with pytest.raises(ValueError):
    JsonlSource(str(tmp_path))


@pytest.mark.parametrize("split", sources.SPLITS)
def test_blank_corpus_is_a_value_error(tmp_path, split):
  """Files that are all empty or whitespace make an empty corpus: ValueError."""
  _write(tmp_path / "empty.txt", "")
  _write(tmp_path / "blank.txt", "\n \n\t\n\r\n   ")
  with pytest.raises(ValueError):
    TextSource(str(tmp_path / "*.txt"), split=split)


def test_unknown_split_is_a_value_error(tmp_path):
  """Only line / paragraph / file are splits."""
  path = _write(tmp_path / "a.txt", "text\n")
  for split in ("sentence", "lines", ""):
    with pytest.raises(ValueError, match="split"):
      TextSource(path, split=split)


def test_empty_pattern_is_a_value_error():
  """No pattern at all is a ValueError, not an empty corpus."""
  for patterns in ("", ",", []):
    with pytest.raises(ValueError):
      TextSource(patterns)


# Invalid UTF-8.


@pytest.mark.parametrize("split", sources.SPLITS)
def test_invalid_utf8_is_replaced_and_reported(tmp_path, split, caplog):
  """A file with invalid bytes is read with U+FFFD replacements and a warning counting them."""
  good = _write(tmp_path / "a_good.txt", "clean line\n")
  # Three invalid sequences (\xff, \xfe, a lone \xc3); the genuine U+FFFD is not one of them.
  data = b"ok \xef\xbf\xbd line\nbad \xff\xfe here\n\n\xc3( end\n"
  bad = _write(tmp_path / "b_bad.txt", data)
  with caplog.at_level(pylogging.WARNING):
    source = TextSource([good, bad], split=split)
  text = data.decode("utf-8", errors="replace")
  assert _docs(source) == _REFERENCE[split]("clean line\n") + _REFERENCE[split](text)
  assert "bad \ufffd\ufffd here" in "\n".join(_docs(source))
  reports = [m for m in _warnings(caplog) if bad in m]
  assert len(reports) == 1, _warnings(caplog)
  assert re.search(r"\b3\b", reports[0].replace(bad, "")), reports[0]
  assert not [m for m in _warnings(caplog) if good in m]


def test_valid_utf8_logs_nothing(tmp_path, caplog):
  """Clean text, U+FFFD itself included, gives no warning."""
  path = _write(tmp_path / "a.txt", "fine \ufffd text 🦊\n")
  with caplog.at_level(pylogging.WARNING):
    assert _docs(TextSource(path)) == ["fine \ufffd text 🦊"]
  assert not _warnings(caplog)


# JsonlSource.


def test_jsonl_documents_are_the_field_values(tmp_path):
  """Documents are the field's string values, escapes decoded, across files in order."""
  values = ["plain", "with \"quotes\" and \\ backslash", "two\nlines\n", "x", "naïve 🦊 日本語",
            "tab\there", " spaced "]
  lines = [json.dumps({"id": k, "body": v}, ensure_ascii=k % 2 == 0) for k, v in enumerate(values)]
  a = _write(tmp_path / "a.jsonl", "\n".join(lines[:4]) + "\n")
  b = _write(tmp_path / "b.jsonl", "\n\n".join(lines[4:]))  # blank lines and no final newline
  source = JsonlSource(f"{b},{a}", field="body")
  expected = values[4:] + values[:4]
  assert _docs(source) == expected
  assert source.skipped == []
  np.testing.assert_array_equal(source.sizes, [len(v.encode("utf-8")) for v in expected])


def test_jsonl_skips_and_reports_bad_lines(tmp_path, caplog):
  """Lines lacking a string field, or not JSON objects, are skipped, counted and reported."""
  content = "\n".join([
      '{"text": "first"}',          # 1
      '{"title": "no text"}',       # 2: no field
      '{"text": 5}',                # 3: not a string
      'not json at all',            # 4: invalid JSON
      '',                           # 5: blank, ignored silently
      '{"text": "second é"}',       # 6
      '[1, 2, 3]',                  # 7: not an object
      '{"text": "third", "x": 1}',  # 8
      '{"text": " \\n "}',          # 9: blank text
  ]) + "\n"
  path = _write(tmp_path / "d.jsonl", content)
  with caplog.at_level(pylogging.WARNING):
    source = JsonlSource(path)
  assert _docs(source) == ["first", "second é", "third"]
  assert len(source.skipped) == 5
  for line_no, problem in zip((2, 3, 4, 7, 9), source.skipped):
    assert f"{path}:{line_no}" in problem
  assert "blank" in source.skipped[-1]
  logged = "\n".join(_warnings(caplog))
  for line_no in (2, 3, 4, 7):
    assert f"{path}:{line_no}" in logged
  assert f"{path}:5" not in logged and f"{path}:1:" not in logged


def test_jsonl_without_the_field_is_a_value_error(tmp_path):
  """A file where no line has the field is an error, naming the field."""
  path = _write(tmp_path / "d.jsonl", '{"body": "a"}\n{"body": "b"}\n')
  assert _docs(JsonlSource(path, field="body")) == ["a", "b"]
  with pytest.raises(ValueError, match="text"):
    JsonlSource(path, field="text")


def test_jsonl_invalid_utf8_is_replaced(tmp_path, caplog):
  """Invalid bytes inside a JSON string read as U+FFFD, with a warning naming the file."""
  path = _write(tmp_path / "d.jsonl", b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
  with caplog.at_level(pylogging.WARNING):
    source = JsonlSource(path)
  assert _docs(source) == ["ok", "bad \ufffd byte"]
  assert any(path in m for m in _warnings(caplog))


# ArrayRecordSource.


def test_array_record_text_shards(tmp_path):
  """Shards without meta.json hold UTF-8 text records, read back as str in shard order."""
  texts = ["first record", "naïve 🦊", "", "line\nbreak"]
  a = _write_shard(tmp_path / "b.array_record", [t.encode() for t in texts[:2]])
  b = _write_shard(tmp_path / "a.array_record", [t.encode() for t in texts[2:]])
  source = ArrayRecordSource(f"{a},{b}")
  assert source.tokenizer is None
  assert _docs(source) == texts
  np.testing.assert_array_equal(source.sizes, [len(t.encode()) for t in texts])
  # A directory reads its *.array_record files, sorted.
  assert _docs(ArrayRecordSource(str(tmp_path))) == texts[2:] + texts[:2]


@pytest.mark.parametrize("dtype", ["int32", "uint16"])
def test_array_record_token_shards(tmp_path, dtype):
  """With meta.json beside them, records are token arrays of its dtype; .tokenizer is its spec."""
  rng = np.random.default_rng(1)
  arrays = [rng.integers(0, 60000, size=n).astype(dtype) for n in (5, 1, 17, 3, 8)]
  _write_shard(tmp_path / "shard-00000.array_record", [x.tobytes() for x in arrays[:3]])
  _write_shard(tmp_path / "shard-00001.array_record", [x.tobytes() for x in arrays[3:]])
  _write_shard(tmp_path / "other.bin", [b"not a shard of this set"])
  meta = {"tokenizer": "byte", "dtype": dtype, "num_tokens": 34}
  _write(tmp_path / "meta.json", json.dumps(meta))
  source = ArrayRecordSource(str(tmp_path))
  assert source.tokenizer == "byte"
  assert len(source) == len(arrays)
  for got, want in zip(_docs(source), arrays):
    assert isinstance(got, np.ndarray) and np.issubdtype(got.dtype, np.integer)
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(source.sizes, [len(x) for x in arrays])


# builtin_source.


@pytest.mark.parametrize("split", sources.SPLITS)
def test_builtin_source(split):
  """The standard-library corpus is non-empty, all text, and the same every time."""
  a, b = sources.builtin_source(split), sources.builtin_source(split)
  assert len(a) == len(b) > 0
  indices = np.unique(np.linspace(0, len(a) - 1, 50).astype(int))
  docs = [a[i] for i in indices]
  assert all(isinstance(d, str) and d.strip() for d in docs)
  assert docs == [b[i] for i in indices]
  np.testing.assert_array_equal(a.sizes, b.sizes)
  np.testing.assert_array_equal(a.sizes[indices], [len(d.encode("utf-8")) for d in docs])


# Pickling, as Grain's worker processes do.


def _roundtrip_pickle(source):
  before = _docs(source)  # opens the files' mmaps first
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == len(source)
  after = _docs(clone)
  if before and isinstance(before[0], np.ndarray):
    for x, y in zip(before, after):
      np.testing.assert_array_equal(x, y)
  else:
    assert after == before
  np.testing.assert_array_equal(clone.sizes, source.sizes)
  return clone


def test_sources_pickle(tmp_path):
  """Text, JSONL, ArrayRecord and split sources pickle after reading, and read the same."""
  rng = np.random.default_rng(2)
  _write(tmp_path / "a.txt", _random_text(rng, 50))
  _write(tmp_path / "b.txt", "")
  _write(tmp_path / "c.txt", _random_text(rng, 50))
  for split in sources.SPLITS:
    _roundtrip_pickle(TextSource(str(tmp_path / "*.txt"), split=split))
  jsonl = _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": w}) + "\n" for w in _WORDS))
  _roundtrip_pickle(JsonlSource(jsonl))
  shards = tmp_path / "shards"
  shards.mkdir()
  _write_shard(shards / "s.array_record", [np.arange(k + 1, dtype=np.int32).tobytes()
                                          for k in range(6)])
  _write(shards / "meta.json", json.dumps({"tokenizer": "byte:5", "dtype": "int32"}))
  assert _roundtrip_pickle(ArrayRecordSource(str(shards))).tokenizer == "byte:5"
  text = TextSource(str(tmp_path / "*.txt"))
  for method in ("tail", "hash"):
    for part in split_source(text, 0.3, method=method):
      _roundtrip_pickle(part)
