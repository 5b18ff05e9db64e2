"""nanoGPT-style character LM on one long text: CharTokenizer, TextSource(split="chunk") and
make_pipeline(shuffle_window=N).

Files are written into tmp_path as bytes, so CRLF line ends, blank lines and a final line
without a newline reach the source exactly as written.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from llmjax.data import TextSource, load_tokenizer, make_pipeline, split_source
from llmjax.data.sources import CHUNK_BYTES
from llmjax.data.tokenizers import CharTokenizer
from llmjax.objectives import CausalLM
from tests.data.common import assert_batches_equal, take
from tests.data.pipeline_test import _check_resume

C = CHUNK_BYTES
_BLANK = b" \t\n\r\v\f"  # what the sources count as whitespace
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz ABCDE,.;:!?'-") + ["é", "ß", "→", "日", "本", "🦊", "\t"]


def _write(path, content) -> str:
  with open(path, "wb") as f:
    f.write(content.encode("utf-8") if isinstance(content, str) else content)
  return str(path)


def _lines_text(rng, num_lines, max_chars=60, blank_every=0, alphabet=_ALPHABET) -> str:
  """Random lines of 1..max_chars characters joined by "\\n" (plus a final one); with
  blank_every=k, about one line in k is empty."""
  lines = []
  for _ in range(num_lines):
    if blank_every and rng.integers(blank_every) == 0:
      lines.append("")
    else:
      lines.append("".join(rng.choice(alphabet, rng.integers(1, max_chars + 1))))
  return "\n".join(lines) + "\n"


def _docs(source) -> list[str]:
  return [source[i] for i in range(len(source))]


def _has_text(data: bytes) -> bool:
  return bool(data.strip(_BLANK))


def _reference_chunks(data: bytes) -> list[str]:
  """The chunk split, written plainly: lines are cut at "\\n"; a line ends a chunk when its text
  (without "\\r\\n" / "\\n") reaches the next multiple of C; blank chunks are dropped."""
  parts = data.split(b"\n")
  lines = [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
  cuts, offset, target = [0], 0, C
  for line in lines:
    content_end = offset + len(line.removesuffix(b"\n").removesuffix(b"\r"))
    offset += len(line)
    if content_end >= target:
      if offset < len(data):
        cuts.append(offset)
      target = (content_end // C + 1) * C
  pieces = [data[a:b] for a, b in zip(cuts, cuts[1:] + [len(data)])]
  return [p.decode("utf-8", errors="replace") for p in pieces if _has_text(p)]


def _check_chunks(path, data: bytes) -> list[str]:
  """Invariants of every chunk split of a one-file source; returns the chunks."""
  source = TextSource(path, split="chunk")
  docs = _docs(source)
  assert docs == _reference_chunks(data)
  np.testing.assert_array_equal(source.sizes, [len(d.encode("utf-8")) for d in docs])
  assert all(_has_text(d.encode("utf-8")) for d in docs)
  # Each chunk sits in the file right after the previous one (up to skipped blank chunks),
  # begins at a line start and ends at a line start or the end of the file.
  position = 0
  for i, doc in enumerate(docs):
    raw = doc.encode("utf-8")
    start = data.index(raw, position)
    assert not _has_text(data[position:start]), f"chunk {i}: text skipped before it"
    assert start == 0 or data[start - 1:start] == b"\n", f"chunk {i} starts mid-line"
    end = start + len(raw)
    assert end == len(data) or raw.endswith(b"\n"), f"chunk {i} ends mid-line"
    position = end
  assert not _has_text(data[position:]), "text after the last chunk"
  return docs


# --------------------------------------------------------------------------- CharTokenizer


@pytest.fixture(scope="module")
def unicode_file(tmp_path_factory):
  """(path, text): ~6 KB of lines over _ALPHABET, a few blank, unicode and tabs included."""
  text = _lines_text(np.random.default_rng(0), 200, blank_every=15)
  path = tmp_path_factory.mktemp("chars") / "text.txt"
  return _write(path, text), text


def test_char_round_trip(unicode_file):
  """decode(encode(s)) == s for slices of the file and random strings of its alphabet; one
  int32 id per character."""
  path, text = unicode_file
  tok = CharTokenizer(path)
  rng = np.random.default_rng(1)
  alphabet = sorted(set(text))
  samples = [text, "", "\n", "\n\n日本\t🦊\n"]
  samples += [text[a:a + int(n)] for a, n in zip(rng.integers(0, len(text), 20),
                                                   rng.integers(0, 300, 20))]
  samples += ["".join(rng.choice(alphabet, int(n))) for n in rng.integers(1, 200, 20)]
  for s in samples:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.shape == (len(s),)
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == s
  assert tok.decode_batch(tok.encode_batch(samples)) == samples


def test_char_ids_follow_sorted_characters(unicode_file):
  """The vocabulary is the file's distinct characters; id k is the k-th in sorted order."""
  path, text = unicode_file
  tok = CharTokenizer(path)
  chars = sorted(set(text))
  assert tok.vocab_size == len(chars) == len(tok.chars)
  assert list(tok.chars) == chars
  np.testing.assert_array_equal(tok.encode("".join(chars)), np.arange(len(chars)))
  for k, c in enumerate(chars):
    assert tok.encode(c).tolist() == [k]
  assert tok.decode(np.arange(len(chars))) == "".join(chars)
  # Ids order like their characters.
  a, b = "\n", "🦊"
  assert (tok.encode(a)[0] < tok.encode(b)[0]) == (a < b)


def test_char_has_no_special_ids(unicode_file):
  """No special ids: CausalLM needs add_bos=False, add_eos=False, and then works."""
  tok = CharTokenizer(unicode_file[0])
  for name in ("pad_id", "eos_id", "bos_id", "unk_id", "mask_id", "cls_id", "sep_id"):
    assert getattr(tok, name) is None, name
  assert tok.sentinel_ids == () and tok.special_ids == frozenset()
  with pytest.raises(ValueError, match="bos_id"):
    CausalLM(tok, 16)
  with pytest.raises(ValueError, match="eos_id"):
    CausalLM(tok, 16, add_bos=False)
  CausalLM(tok, 16, add_bos=False, add_eos=False)


@pytest.mark.parametrize("char", ["Z", "🦊", "\x00", "\r", "ü"])
def test_char_unknown_character_is_named(tmp_path, char):
  """Text with a character outside the vocabulary raises ValueError that names it."""
  tok = CharTokenizer(_write(tmp_path / "v.txt", "abc def\nxyz\n"))
  with pytest.raises(ValueError, match=re.escape(repr(char))):
    tok.encode("abc" + char + "def")


def test_char_fingerprint_is_the_character_set(tmp_path):
  """Equal for files with the same characters (any order, counts, length); else different."""
  fp = lambda text, name: CharTokenizer(_write(tmp_path / name, text)).fingerprint
  base = fp("hello world\n", "a.txt")
  assert base.startswith("char:")
  assert fp("dlrow olleh\nhello\n\n", "b.txt") == base
  assert fp("hello world\n", "c.txt") == base  # another path, same characters
  assert fp("hello world!\n", "d.txt") != base  # one more character
  assert fp("hello world", "e.txt") != base  # one fewer ("\n")
  assert fp("hellp world\n", "f.txt") != base  # one swapped
  assert fp("héllo world\n", "g.txt") != base


def test_load_tokenizer_char_spec(unicode_file):
  """load_tokenizer("char:PATH") is that file's CharTokenizer; its spec loads it again."""
  path, text = unicode_file
  tok = load_tokenizer("char:" + path)
  assert isinstance(tok, CharTokenizer)
  assert tok.spec == "char:" + path
  again = load_tokenizer(tok.spec)
  assert again.fingerprint == tok.fingerprint and again.chars == tok.chars
  np.testing.assert_array_equal(again.encode(text), tok.encode(text))


def test_char_tokenizer_errors(tmp_path):
  """A missing file (or a directory) is FileNotFoundError; an empty file is ValueError."""
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    CharTokenizer(missing)
  with pytest.raises(FileNotFoundError):
    load_tokenizer("char:" + missing)
  with pytest.raises(FileNotFoundError):
    CharTokenizer(str(tmp_path))
  empty = _write(tmp_path / "empty.txt", b"")
  with pytest.raises(ValueError, match="empty"):
    CharTokenizer(empty)
  with pytest.raises(ValueError):
    load_tokenizer("char:" + empty)


def test_char_word_starts(tmp_path):
  """A word starts at position 0, at whitespace and right after whitespace."""
  tok = CharTokenizer(_write(tmp_path / "w.txt", "ab cd\nef\tg日 h\n"))
  text = "ab cd\nef\tg日  h"
  space = np.array([c.isspace() for c in text])
  want = space | np.concatenate([[True], space[:-1]])
  np.testing.assert_array_equal(tok.word_starts(tok.encode(text)), want)
  np.testing.assert_array_equal(tok.word_starts(tok.encode(text).tolist()), want)
  assert tok.word_starts(np.zeros(0, np.int32)).shape == (0,)


def test_char_word_starts_of_an_empty_list(tmp_path):
  """word_starts([]) is an empty mask, as for ByteTokenizer (not an IndexError)."""
  tok = CharTokenizer(_write(tmp_path / "w.txt", "ab cd\n"))
  assert np.asarray(tok.word_starts([])).shape == (0,)


@pytest.mark.parametrize("content", [b"ab\r\ncd\r\nef gh\r\n", b"one\rtwo\nthree\n"],
                         ids=["crlf", "lone_cr"])
def test_char_vocabulary_is_the_bytes_the_source_reads(tmp_path, content):
  """Every chunk of a file encodes with that file's CharTokenizer: a "\\r" the source keeps
  (CRLF line ends, a lone CR) is in the vocabulary, not translated away by text-mode reading."""
  path = _write(tmp_path / "cr.txt", content)
  tok = CharTokenizer(path)
  assert "\r" in tok.chars
  assert tok.vocab_size == len(set(content.decode("utf-8")))
  for doc in _docs(TextSource(path, split="chunk")):
    assert tok.decode(tok.encode(doc)) == doc


# --------------------------------------------------------------------------- chunk split


def test_chunks_of_short_lines_are_about_chunk_bytes(tmp_path):
  """~20 KB of short lines: chunks cover the file exactly, are cut after the line that reaches
  each multiple of CHUNK_BYTES, and are CHUNK_BYTES long give or take a line."""
  text = _lines_text(np.random.default_rng(2), 600, max_chars=40)
  data = text.encode("utf-8")
  docs = _check_chunks(_write(tmp_path / "s.txt", data), data)
  assert "".join(docs) == text
  longest = max(len(line.encode("utf-8")) + 1 for line in text.split("\n"))
  sizes = [len(d.encode("utf-8")) for d in docs]
  assert sizes[0] >= C
  assert all(abs(s - C) <= longest for s in sizes[:-1]), (sizes, longest)
  assert sizes[-1] <= C + longest
  assert abs(len(docs) - len(data) / C) <= 1
  # The k-th cut lies just past k * C: at the end of the line holding byte k * C or the
  # next line with text.
  ends = np.cumsum(sizes)[:-1]
  for k, end in enumerate(ends, 1):
    assert k * C < end <= k * C + longest, (k, end)


@pytest.mark.parametrize("kind", ["crlf", "blank_lines", "no_final_newline", "long_line",
                                  "only_long_line", "short_file", "one_line_no_newline",
                                  "unicode"])
def test_chunks_concatenate_to_the_file(tmp_path, kind):
  """Chunks in order are the file, byte for byte: no line end, CR or blank line lost."""
  rng = np.random.default_rng(3)
  text = _lines_text(rng, 150)
  if kind == "crlf":
    text = text.replace("\n", "\r\n")
  elif kind == "blank_lines":  # blank runs shorter than a chunk, so no chunk is all blank
    text = "\n\n" + _lines_text(rng, 200, blank_every=3) + "\n \n\t\n"
  elif kind == "no_final_newline":
    text = text + "the last line, unterminated"
  elif kind == "long_line":
    text = text + "x" * (3 * C + 17) + "\n" + _lines_text(rng, 60)
  elif kind == "only_long_line":
    text = "y" * (2 * C + 5) + "\n"
  elif kind == "short_file":
    text = "To be, or not to be\r\n\nthat is the question.\n"
  elif kind == "one_line_no_newline":
    text = "z" * (C + 300)
  elif kind == "unicode":
    text = _lines_text(rng, 300, alphabet=["日", "本", "🦊", "é", " ", "→"])
  data = text.encode("utf-8")
  docs = _check_chunks(_write(tmp_path / f"{kind}.txt", data), data)
  assert "".join(docs) == text
  if len(data) < C or kind in ("only_long_line", "one_line_no_newline"):
    assert docs == [text]
  if kind == "long_line":  # the long line is whole, in one chunk
    assert any("x" * (3 * C + 17) + "\n" in d for d in docs)
  if kind == "crlf":  # never cut between "\r" and "\n"
    assert not any(d.startswith("\n") for d in docs)
    assert all(d.endswith("\r\n") for d in docs)
  assert "\ufffd" not in "".join(docs)  # never cut inside a character


def test_all_blank_chunks_are_skipped(tmp_path):
  """A chunk of blank lines only is dropped; every kept chunk has text and, joined, they hold
  all of the file's text in order."""
  text = "first line\n" + "\n" * (3 * C) + " \t \n" * 300 + "last line\n" + "\n" * (2 * C)
  data = text.encode()
  docs = _check_chunks(_write(tmp_path / "b.txt", data), data)
  assert len(docs) == 2 and docs[0].startswith("first line\n") and "last line\n" in docs[1]
  assert len("".join(docs)) < len(text)
  assert re.sub(r"\s", "", "".join(docs)) == re.sub(r"\s", "", text)


def test_chunks_never_span_files(tmp_path):
  """Several files (an empty one among them): each file's chunks concatenate to it, in order."""
  rng = np.random.default_rng(4)
  texts = [_lines_text(rng, 100), "", _lines_text(rng, 3) + "tail without newline",
           _lines_text(rng, 70).replace("\n", "\r\n")]
  paths = [_write(tmp_path / f"f{i}.txt", t) for i, t in enumerate(texts)]
  whole = _docs(TextSource(paths, split="chunk"))
  expected = [d for t, p in zip(texts, paths) if t for d in _docs(TextSource(p, split="chunk"))]
  assert whole == expected
  assert "".join(whole) == "".join(texts)


@pytest.mark.parametrize("fraction", [0.1, 0.37])
def test_tail_split_of_chunks_is_the_whole_text(tmp_path, fraction):
  """split_source(method="tail") of a chunked file: train then validation is the file; the
  validation share is `fraction` of its bytes; every piece encodes with the file's tokenizer."""
  text = _lines_text(np.random.default_rng(5), 400)
  path = _write(tmp_path / "t.txt", text)
  source = TextSource(path, split="chunk")
  train, val = split_source(source, fraction, method="tail")
  train_docs, val_docs = _docs(train), _docs(val)
  assert "".join(train_docs) + "".join(val_docs) == text
  total, val_size = len(text.encode()), len("".join(val_docs).encode())
  assert abs(val_size - fraction * total) <= 3.5
  assert all(train_docs) and all(val_docs)
  np.testing.assert_array_equal(val.sizes, [len(d.encode()) for d in val_docs])
  tok = CharTokenizer(path)
  for doc in train_docs + val_docs:
    assert tok.decode(tok.encode(doc)) == doc


# --------------------------------------------------------------------------- pipeline

SEQ = 32


@pytest.fixture(scope="module")
def char_corpus(tmp_path_factory):
  """(path, tokenizer, source): ~10 KB of unicode lines as ~10 chunks."""
  text = _lines_text(np.random.default_rng(6), 300, blank_every=20)
  path = _write(tmp_path_factory.mktemp("char") / "corpus.txt", text)
  return path, CharTokenizer(path), TextSource(path, split="chunk")


def _objective(tok):
  return CausalLM(tok, SEQ, add_bos=False, add_eos=False)


def _pipeline(corpus, **kwargs):
  path, tok, _ = corpus
  args = dict(batch_size=4, seed=3, shard_index=0, shard_count=1, prefetch=0)
  args.update(kwargs)
  # Everything rebuilt each time, as a restarted run would.
  return make_pipeline(TextSource(path, split="chunk"), CharTokenizer(path), _objective(tok),
                       **args)


@pytest.mark.parametrize("shuffle_window", [0, 16])
def test_concat_epoch_reads_the_text_in_order(char_corpus, shuffle_window):
  """Unshuffled, one epoch of concat-packed rows is each chunk's characters in order (inputs all
  but its last, targets all but its first); only the last batch has padding, at its end.
  shuffle_window does nothing without shuffle."""
  path, tok, source = char_corpus
  batches = take(_pipeline(char_corpus, shuffle=False, num_epochs=1, packing="concat",
                           shuffle_window=shuffle_window))
  ids = [tok.encode(d) for d in _docs(source)]
  want_tokens = np.concatenate([i[:-1] for i in ids])
  want_targets = np.concatenate([i[1:] for i in ids])
  for b in batches:
    assert ((b["tokens"] >= 0) & (b["tokens"] < tok.vocab_size)).all()
    assert ((b["targets"] >= 0) & (b["targets"] < tok.vocab_size)).all()
    assert (b["weights"] <= (b["segment_ids"] > 0)).all()  # 0: padding, or re-read context
  for b in batches[:-1]:
    assert (b["segment_ids"] > 0).all()
  real = batches[-1]["segment_ids"].reshape(-1) > 0
  assert real.any() and not (np.diff(real.astype(int)) > 0).any()  # padding only at the end
  tokens = np.concatenate([b["tokens"][b["weights"] > 0] for b in batches])
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(targets, want_targets)
  assert tok.decode(tokens) == "".join(d[:-1] for d in _docs(source))
  real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert len(batches) == -(-real // (4 * SEQ))


def _examples(batches) -> list[tuple]:
  """The (tokens, targets) of each row of "pad" batches, padding rows left out."""
  out = []
  for b in batches:
    for row in range(len(b["tokens"])):
      n = int((b["segment_ids"][row] > 0).sum())
      if n:
        out.append((tuple(b["tokens"][row, :n].tolist()), tuple(b["targets"][row, :n].tolist())))
  return out


def test_shuffle_window_keeps_the_epoch_and_changes_the_order(char_corpus):
  """One epoch with shuffle_window holds the same causal-LM examples as without (a multiset),
  in another order; consecutive windows of a chunk no longer always follow each other."""
  plain = _examples(take(_pipeline(char_corpus, num_epochs=1, packing="pad")))
  windowed = _examples(take(_pipeline(char_corpus, num_epochs=1, packing="pad",
                                      shuffle_window=16)))
  _, tok, source = char_corpus
  where, want = {}, collections.Counter()  # example -> (chunk, window index)
  for d, doc in enumerate(_docs(source)):
    ids = tok.encode(doc)
    starts = list(range(0, len(ids) - 1, SEQ))
    for k, s in enumerate(starts):
      if k and k == len(starts) - 1:  # the last window reaches back to full length
        s = len(ids) - SEQ - 1
      w = ids[s:s + SEQ + 1]
      example = (tuple(w[:-1].tolist()), tuple(w[1:].tolist()))
      want[example] += 1
      where[example] = (d, k)
  assert collections.Counter(plain) == want
  assert collections.Counter(windowed) == want
  assert windowed != plain

  def follows(examples):  # how often an example is the next window of the previous one's chunk
    pos = [where[e] for e in examples]
    return sum(d == e and k + 1 == j for (d, k), (e, j) in zip(pos, pos[1:]))
  # Without the window every chunk's windows arrive in order.
  assert follows(plain) == len(plain) - len(source)
  assert follows(windowed) < follows(plain)


def test_shuffle_window_is_deterministic(char_corpus):
  """The same seed gives the same batches; another seed, or no window, other ones; a window
  of 1 is no window."""
  make = lambda **kw: take(_pipeline(char_corpus, packing="concat", **kw), 12)
  a = make(shuffle_window=16)
  assert_batches_equal(a, make(shuffle_window=16))
  assert not all(np.array_equal(x["tokens"], y["tokens"])
                 for x, y in zip(a, make(shuffle_window=16, seed=4)))
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, make()))
  assert not all(np.array_equal(x["tokens"], y["tokens"])
                 for x, y in zip(a, make(shuffle_window=8)))
  assert_batches_equal(make(shuffle_window=1), make())


@pytest.mark.parametrize("packing,stop", [("concat", 5), ("concat", 37), ("pack", 23)])
def test_shuffle_window_resumes_exactly(char_corpus, packing, stop):
  """get_state/set_state mid-window (and across epochs) gives the next batches exactly."""
  _check_resume(lambda: _pipeline(char_corpus, packing=packing, shuffle_window=16, prefetch=2),
                stop=stop, n=60)


@pytest.mark.parametrize("saved,now", [(16, 32), (16, 0), (0, 16)])
def test_state_of_another_shuffle_window_is_refused(char_corpus, saved, now):
  """A state saved with one shuffle_window is refused, by name, by a pipeline with another."""
  it = iter(_pipeline(char_corpus, packing="concat", shuffle_window=saved))
  next(it)
  state = it.get_state()
  it.close()
  other = iter(_pipeline(char_corpus, packing="concat", shuffle_window=now))
  with pytest.raises(ValueError, match=f"shuffle_window={saved}"):
    other.set_state(state)
  other.close()
