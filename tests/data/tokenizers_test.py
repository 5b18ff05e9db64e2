"""Tokenizers: the byte tokenizer's layout and round trip, SentencePiece training and loading."""

import pickle
import re

import numpy as np
import pytest
import sentencepiece as spm

from llmjax.data import sources
from llmjax.data.tokenizers import (SPECIALS, ByteTokenizer, SentencePieceTokenizer, check_vocab,
                                    load_tokenizer, train_sentencepiece)

TEXTS = ["", "hello", "héllo wörld", "日本語のテキストです。", "🦊🎉 emoji 👩‍👩‍👧 family",
         "line one\nline two\r\n\tindented\n\n", "\x00 nul and \x7f del", "Ωmega ∑ ≠ ∞ ﬁ ＡＢＣ",
         "  spaces   inside  ", "<extra_id_0> [MASK] written as text"]


def _random_unicode(rng, n):
  """Random code points from ASCII up to the astral planes, surrogates excluded."""
  points = []
  while len(points) < n:
    top = int(rng.choice([0x80, 0x800, 0x10000, 0x110000]))
    p = int(rng.integers(0, top))
    if not 0xD800 <= p < 0xE000:
      points.append(p)
  return "".join(map(chr, points))


# ByteTokenizer.


def test_byte_round_trip():
  """decode(encode(s)) == s; one id per UTF-8 byte, all in [offset, offset + 256)."""
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)
  for text in TEXTS + [_random_unicode(rng, 200) for _ in range(20)]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.frombuffer(text.encode("utf-8"), np.uint8) + tok.offset)
    assert ((ids >= tok.offset) & (ids < tok.offset + 256)).all()
    assert tok.decode(ids) == text
  assert tok.decode_batch(tok.encode_batch(TEXTS)) == TEXTS


@pytest.mark.parametrize("num_sentinels", [0, 1, 5, 100])
def test_byte_layout(num_sentinels):
  """Seven distinct specials, 256 byte ids, then `num_sentinels` sentinels: nothing overlaps."""
  tok = ByteTokenizer(num_sentinels)
  specials = [tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id, tok.cls_id, tok.sep_id]
  assert None not in specials and len(set(specials)) == len(SPECIALS)
  assert len(tok.sentinel_ids) == len(set(tok.sentinel_ids)) == num_sentinels
  assert tok.vocab_size == 7 + 256 + num_sentinels
  text_ids = set(range(tok.offset, tok.offset + 256))
  assert not (set(specials) | set(tok.sentinel_ids)) & text_ids
  assert not set(specials) & set(tok.sentinel_ids)
  assert all(0 <= i < tok.vocab_size for i in specials + list(tok.sentinel_ids))
  never_text = [tok.pad_id, tok.eos_id, tok.bos_id, tok.mask_id, tok.cls_id, tok.sep_id]
  assert set(never_text) | set(tok.sentinel_ids) <= tok.special_ids
  assert not tok.special_ids & text_ids


def test_byte_negative_sentinels_is_an_error():
  with pytest.raises(ValueError):
    ByteTokenizer(-1)


def test_byte_decode_specials():
  """pad / eos / bos vanish; [MASK] [CLS] [SEP] [UNK] and sentinels are written by name."""
  tok = ByteTokenizer(num_sentinels=3)
  enc = tok.encode
  ids = np.concatenate([
      [tok.bos_id, tok.cls_id], enc("ab"), [tok.mask_id], enc("é"), [tok.sentinel_ids[0]],
      enc("c"), [tok.sentinel_ids[2], tok.sep_id, tok.unk_id], enc("🦊"),
      [tok.eos_id, tok.pad_id, tok.pad_id]])
  assert tok.decode(ids) == "[CLS]ab[MASK]é<extra_id_0>c<extra_id_2>[SEP][UNK]🦊"
  assert tok.decode([tok.pad_id] * 4) == ""
  assert tok.decode(ids[None, :]) == tok.decode(ids)


def _reference_word_starts(text):
  """Per byte: a character that is whitespace, follows whitespace or opens the text is a start."""
  starts = []
  for j, ch in enumerate(text):
    n = len(ch.encode("utf-8"))
    first = j == 0 or ch in " \t\n\r\v\f" or text[j - 1] in " \t\n\r\v\f"
    starts += [first] + [False] * (n - 1)
  return np.array(starts, bool)


def test_byte_word_starts():
  """Word starts are the bytes at or after whitespace, never inside a multi-byte character."""
  tok = ByteTokenizer()
  rng = np.random.default_rng(1)
  words = ["hello", "wörld", "日本", "🦊x", "a", "ﬁne", "é"]
  for _ in range(30):
    parts = rng.choice(words, size=rng.integers(1, 8)).tolist()
    seps = rng.choice([" ", "  ", "\n", "\t", " \r\n"], size=len(parts)).tolist()
    text = "".join(s + p for s, p in zip(seps, parts))[int(rng.integers(2)):]
    ids = tok.encode(text)
    starts = tok.word_starts(ids)
    assert starts.shape == ids.shape and starts.dtype == bool
    np.testing.assert_array_equal(starts, _reference_word_starts(text), err_msg=repr(text))
    continuation = (ids - tok.offset >= 0x80) & (ids - tok.offset < 0xC0)
    assert not (starts & continuation).any()
  # Hand-checked: "ab 日c": a starts, b does not, the space and 日's lead byte do, c does not.
  np.testing.assert_array_equal(tok.word_starts(tok.encode("ab 日c")),
                                [True, False, True, True, False, False, False])
  # A chunk cut inside a character starts with continuation bytes: they start nothing.
  np.testing.assert_array_equal(tok.word_starts(tok.encode("🦊 x")[2:]),
                                [False, False, True, True])


def test_load_byte_tokenizer():
  """"byte" has 100 sentinels, "byte:N" has N; the spec loads back to the same tokenizer."""
  assert len(load_tokenizer("byte").sentinel_ids) == 100
  assert load_tokenizer("byte").vocab_size == 363
  tok = load_tokenizer("byte:5")
  assert isinstance(tok, ByteTokenizer) and len(tok.sentinel_ids) == 5 and tok.vocab_size == 268
  assert load_tokenizer("byte:0").vocab_size == 263
  for n in (0, 5, 100):
    spec = ByteTokenizer(n).spec
    assert load_tokenizer(spec).sentinel_ids == ByteTokenizer(n).sentinel_ids
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode("héllo"), tok.encode("héllo"))
  assert clone.sentinel_ids == tok.sentinel_ids


@pytest.mark.parametrize("spec", ["bytes", "byte:x", "byte:-1", "byte:1.5", "gpt2", "tok/spm"])
def test_load_bad_spec(spec):
  """Specs that are neither byte[:N] nor a .model path are ValueErrors naming the spec."""
  with pytest.raises(ValueError, match=re.escape(repr(spec))):
    load_tokenizer(spec)


# SentencePiece.

NUM_SENTINELS = 5
VOCAB = 400
UNSEEN = "naïve 🦊🎉 emoji ✓ 漢字 ♞ x"


@pytest.fixture(scope="module")
def corpus():
  source = sources.builtin_source("line")
  lines = [source[i] for i in range(min(len(source), 5000))]  # enough, and trains in ~1 s
  assert not any(ch in "".join(lines) for ch in "🦊🎉✓漢字♞")  # UNSEEN really is unseen
  return lines


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def sp(request, corpus, tmp_path_factory):
  """A model with [MASK]/[CLS]/[SEP] and sentinels, trained on the standard-library lines."""
  prefix = str(tmp_path_factory.mktemp(request.param) / "spm")
  tok = train_sentencepiece(corpus, prefix, vocab_size=VOCAB, model_type=request.param,
                            num_sentinels=NUM_SENTINELS, bert_specials=True)
  return tok, prefix + ".model"


def test_sp_special_ids(sp):
  """pad 0, eos 1, bos 2, unk 3, then [MASK] [CLS] [SEP], then the sentinels in order."""
  tok, path = sp
  assert isinstance(tok, SentencePieceTokenizer)
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert (tok.mask_id, tok.cls_id, tok.sep_id) == (4, 5, 6)
  assert tok.vocab_size == VOCAB
  assert tok.sentinel_ids == tuple(range(7, 7 + NUM_SENTINELS))
  proto = spm.SentencePieceProcessor(model_file=path)
  for name, i in (("[MASK]", tok.mask_id), ("[CLS]", tok.cls_id), ("[SEP]", tok.sep_id)):
    assert proto.IdToPiece(i) == name
  assert [proto.IdToPiece(i) for i in tok.sentinel_ids] == [
      f"<extra_id_{k}>" for k in range(NUM_SENTINELS)]
  expected = {0, 1, 2, 4, 5, 6, *tok.sentinel_ids}
  assert tok.special_ids == expected
  # Ordinary text never encodes to a special id.
  ids = np.concatenate(tok.encode_batch(TEXTS[:5] + [UNSEEN]))
  assert not set(ids.tolist()) & tok.special_ids


def test_sp_byte_fallback_round_trip(sp):
  """Characters never seen in training round-trip exactly through byte pieces, never unk."""
  tok, _ = sp
  for text in (UNSEEN, "def f(x): return x + 1", "🦊", "日本語のテキスト"):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) > 0
    assert tok.unk_id not in ids.tolist()
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == text
  # Padding is dropped when decoding.
  ids = tok.encode(UNSEEN)
  assert tok.decode(np.concatenate([ids, [tok.pad_id] * 3])) == UNSEEN


def test_sp_batch_agrees(sp):
  """encode_batch / decode_batch are encode / decode on each element."""
  tok, _ = sp
  texts = TEXTS + [UNSEEN]
  batch = tok.encode_batch(texts)
  assert len(batch) == len(texts)
  for ids, text in zip(batch, texts):
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, tok.encode(text))
  assert tok.decode_batch(batch) == [tok.decode(ids) for ids in batch]


def test_sp_word_starts(sp):
  """Each word's first piece starts a word; only pieces opening with ▁ (or controls) do."""
  tok, path = sp
  proto = spm.SentencePieceProcessor(model_file=path)
  ids = tok.encode("import os and the sys module")
  starts = tok.word_starts(ids)
  assert starts.shape == ids.shape and starts.dtype == bool
  pieces = [proto.IdToPiece(i) for i in ids.tolist()]
  np.testing.assert_array_equal(starts, [p.startswith("\u2581") for p in pieces])
  assert starts.sum() == 6


def test_sp_pickle_and_load(sp):
  """Pickled and reloaded tokenizers, and load_tokenizer(path), encode identically."""
  tok, path = sp
  texts = TEXTS + [UNSEEN, "class Foo(object): pass"]
  clones = (pickle.loads(pickle.dumps(tok)), load_tokenizer(path), SentencePieceTokenizer(path))
  for other in clones:
    assert isinstance(other, SentencePieceTokenizer)
    assert other.vocab_size == tok.vocab_size
    assert other.special_ids == tok.special_ids and other.sentinel_ids == tok.sentinel_ids
    for text in texts:
      np.testing.assert_array_equal(other.encode(text), tok.encode(text))
      assert other.decode(tok.encode(text)) == tok.decode(tok.encode(text))
  assert pickle.loads(pickle.dumps(tok)).spec == tok.spec == path


def test_sp_missing_model(tmp_path):
  """A .model path that does not exist is a FileNotFoundError naming it."""
  path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match=re.escape(path)):
    load_tokenizer(path)
  with pytest.raises(FileNotFoundError, match=re.escape(path)):
    SentencePieceTokenizer(path)


def test_sp_without_specials(corpus, tmp_path):
  """A model trained without specials has no mask/cls/sep/sentinels, and require() says so."""
  tok = train_sentencepiece(corpus[:3000], str(tmp_path / "plain"), vocab_size=400)
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.mask_id is None and tok.cls_id is None and tok.sep_id is None
  assert tok.sentinel_ids == ()
  assert tok.special_ids == {0, 1, 2}
  with pytest.raises(ValueError, match="mask_id"):
    tok.require(mask_id=True)
  with pytest.raises(ValueError, match="cls_id.*sep_id"):
    tok.require(eos_id=True, cls_id=True, sep_id=True)
  tok.require(mask_id=False, eos_id=True, bos_id=True, pad_id=True)
  assert tok.decode(tok.encode(UNSEEN)) == UNSEEN


def test_sp_bad_model_type(tmp_path):
  with pytest.raises(ValueError, match="model_type"):
    train_sentencepiece(["a b c"], str(tmp_path / "m"), vocab_size=50, model_type="wordpiece")


# check_vocab.


def test_check_vocab():
  """A tokenizer with more ids than the model's embedding rows is an error naming both sizes."""
  tok = ByteTokenizer(num_sentinels=10)  # 273 ids
  check_vocab(tok, 273)
  check_vocab(tok, 50304)
  for model_vocab in (272, 256, 1):
    with pytest.raises(ValueError) as info:
      check_vocab(tok, model_vocab)
    message = str(info.value)
    assert re.search(r"\b273\b", message) and re.search(rf"\b{model_vocab}\b", message), message
  ByteTokenizer(100).require(mask_id=True, cls_id=True, sep_id=True, eos_id=True, bos_id=True)
