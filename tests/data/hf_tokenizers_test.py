"""Hugging Face tokenizers: our HFTokenizer against transformers' AutoTokenizer on the same files.

Each tokenizer (GPT-2 byte-level BPE, BERT WordPiece, T5 SentencePiece unigram) is trained here
with the `tokenizers` library on a small multilingual corpus and saved by transformers, so the
test needs no model hub.
"""

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers  # slow to import: once, here
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from llmjax.data import HFTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("gpt2", "bert", "t5")
NUM_SENTINELS = 8
SENTENCES = [
    "a ação do coração é a razão da emoção",
    "você não fala português, mas eu falo português muito bem",
    "o pão e a maçã estão à venda na padaria da esquina",
    "não há nação sem educação e sem informação",
    "the quick brown fox jumps over the lazy dog",
    "numbers like 12345 and 3.14 appear in 2024 and 1999",
    "hello, world! isn't it nice? we're here; they've gone.",
    "der schnelle braune Fuchs springt über den faulen Hund",
    "schön und größer ist das Mädchen aus München",
    "le renard brun rapide saute par-dessus le chien paresseux",
    "très élève, où est la bibliothèque? à côté du café",
]
SAMPLES = [
    "A ação do coração:  você não fala português?",
    "Über schön, très élève — 12345 hello, world! isn't it",
    "o pão  e a maçã (3.14) custam R$ 2,50; não é?",
    "The QUICK brown fox... and   triple spaces",
    "line one\nline two\ttabbed",
    "unseen: 日本語 🦊 ñandú",
    "[MASK] and <extra_id_0> written as text",
    "hello , world ! I 'm sure they 're here .",
    "",
]


def _corpus():
  """A few hundred words: the sentences, and 60 lines of their words shuffled."""
  words = " ".join(SENTENCES).split()
  rng = random.Random(0)
  return SENTENCES + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)]


def _build(kind: str, directory: str) -> None:
  """Trains a `kind` tokenizer and saves it with transformers into `directory`."""
  corpus = _corpus()
  if kind == "gpt2":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # GPT-2's hub config asks for space clean-up, which transformers 5 ignores for BPE.
    hf = transformers.GPT2TokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=True)
  elif kind == "bert":  # cased, as multilingual BERT: accents kept
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False))
    hf = transformers.BertTokenizerFast(tokenizer_object=tok, do_lower_case=False,
                                        clean_up_tokenization_spaces=True)
  else:  # T5's pipeline: whitespace split, then ▁ before each word; <unk> must be id 2
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False))
    hf = transformers.T5TokenizerFast(tokenizer_object=tok, extra_ids=NUM_SENTINELS)
  hf.save_pretrained(directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """kind -> the directory its tokenizer was saved in."""
  root = tmp_path_factory.mktemp("hf_tokenizers")
  for kind in KINDS:
    _build(kind, str(root / kind))
  return {kind: str(root / kind) for kind in KINDS}


@pytest.fixture(scope="module", params=KINDS)
def pair(request, saved):
  """(kind, our tokenizer, transformers' tokenizer) loaded from the same directory."""
  directory = saved[request.param]
  return (request.param, load_tokenizer(directory),
          transformers.AutoTokenizer.from_pretrained(directory))


def test_encode_decode_match_transformers(pair):
  """encode is tok(text)["input_ids"]; decode is tok.decode(ids, skip_special_tokens=True)."""
  kind, ours, theirs = pair
  assert isinstance(ours, HFTokenizer)
  for text in SAMPLES:
    ids = ours.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == theirs(text)["input_ids"], (kind, text)
    plain = ours.encode(text, add_special_tokens=False)
    assert plain.tolist() == theirs(text, add_special_tokens=False)["input_ids"], (kind, text)
    assert ours.decode(ids) == theirs.decode(ids.tolist(), skip_special_tokens=True), (kind, text)
    # Special ids anywhere (padding, sentinels, [MASK]) are dropped alike.
    noisy = np.concatenate([ids[:3], sorted(ours.special_ids), ids[3:]]).astype(np.int32)
    assert ours.decode(noisy) == theirs.decode(noisy.tolist(), skip_special_tokens=True)
    assert ours.decode(ids[None, :]) == ours.decode(ids)
  batch = ours.encode_batch(SAMPLES)
  assert [b.tolist() for b in batch] == theirs(SAMPLES)["input_ids"]
  assert ours.decode_batch(batch) == theirs.batch_decode([b.tolist() for b in batch],
                                                         skip_special_tokens=True)
  assert [b.tolist() for b in ours.encode_batch(SAMPLES, add_special_tokens=False)] == [
      ours.encode(t, add_special_tokens=False).tolist() for t in SAMPLES]


def test_post_processor_and_space_clean_up(pair):
  """BERT wraps in [CLS] ... [SEP], T5 appends </s>, GPT-2 adds nothing; BERT's config cleans
  up " ," in decode, GPT-2's asks for it too but transformers 5 never cleans BPE output."""
  kind, ours, _ = pair
  text = "hello , world ! você não ?"
  ids, plain = ours.encode(text), ours.encode(text, add_special_tokens=False).tolist()
  expected = {"gpt2": plain, "bert": [ours.cls_id, *plain, ours.sep_id],
              "t5": [*plain, ours.eos_id]}[kind]
  assert ids.tolist() == expected
  decoded = ours.decode(ids)
  assert decoded == {"gpt2": text, "bert": "hello, world! você não?",
                     "t5": "hello , world ! você não ?"}[kind]


def test_special_ids_match_transformers(pair):
  """Each special id is transformers'; sentinels are the <extra_id_k>; vocab_size is len(tok)."""
  kind, ours, theirs = pair
  for name in ("pad", "eos", "bos", "unk", "mask", "cls", "sep"):
    assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_token_id"), (kind, name)
  assert ours.vocab_size == len(theirs)
  sentinels = [theirs.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(NUM_SENTINELS)]
  assert ours.sentinel_ids == (tuple(sentinels) if kind == "t5" else ())
  named = {ours.pad_id, ours.eos_id, ours.bos_id, ours.mask_id, ours.cls_id, ours.sep_id}
  assert ours.special_ids == (named - {None}) | set(ours.sentinel_ids)
  assert ours.special_ids <= set(theirs.all_special_ids)
  if kind == "gpt2":  # one token is everything
    assert ours.eos_id == ours.bos_id == theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.pad_id is None and ours.mask_id is None
  if kind == "bert":
    ours.require(mask_id=True, cls_id=True, sep_id=True, pad_id=True)
    assert ours.eos_id is None and ours.bos_id is None
  if kind == "t5":
    assert (ours.pad_id, ours.eos_id, ours.unk_id, ours.bos_id) == (0, 1, 2, None)
    with pytest.raises(ValueError, match="bos_id"):
      ours.require(bos_id=True)


def test_pickle_and_spec_round_trip(pair, saved):
  """Pickled copies, load_tokenizer(spec) and the tokenizer.json path itself all agree."""
  kind, ours, _ = pair
  assert ours.spec == saved[kind]
  clones = [pickle.loads(pickle.dumps(ours)), load_tokenizer(ours.spec),
            load_tokenizer(os.path.join(saved[kind], "tokenizer.json"))]
  for other in clones:
    assert isinstance(other, HFTokenizer)
    assert other.fingerprint == ours.fingerprint and other.vocab_size == ours.vocab_size
    assert other.special_ids == ours.special_ids and other.unk_id == ours.unk_id
    for text in SAMPLES:
      ids = ours.encode(text)
      np.testing.assert_array_equal(other.encode(text), ids)
      assert other.decode(ids) == ours.decode(ids)
      np.testing.assert_array_equal(other.word_starts(ids), ours.word_starts(ids))
  assert clones[0].spec == ours.spec


def test_fingerprints_differ(saved):
  prints = {kind: load_tokenizer(directory).fingerprint for kind, directory in saved.items()}
  assert len(set(prints.values())) == len(KINDS), prints
  assert all(p.startswith("hf:") for p in prints.values())


def test_word_starts(pair):
  """Cutting at the word starts gives back the words (and each special token alone)."""
  kind, ours, _ = pair
  words = "a ação do coração você não fala português bem schön élève".split()
  ids = ours.encode(" ".join(words))
  starts = ours.word_starts(ids)
  assert starts.shape == ids.shape and starts.dtype == bool and starts[0]
  groups = np.split(ids, np.flatnonzero(starts)[1:])
  text_groups = [g for g in groups if not set(g.tolist()) & ours.special_ids]
  assert [ours.decode(g).strip() for g in text_groups] == words, kind
  assert len(groups) - len(text_groups) == len(ids) - len(ours.encode(
      " ".join(words), add_special_tokens=False))
  # A word right after a newline or a special token starts, though its piece has no space.
  assert ours.word_starts(ours.encode("a\nação", add_special_tokens=False)).sum() == (
      3 if kind == "gpt2" else 2)
  assert ours.word_starts(np.array([], np.int32)).shape == (0,)


def test_names_without_configs(saved, tmp_path):
  """A bare tokenizer.json finds specials by name; special_tokens_map.json dicts are read."""
  for kind in KINDS:
    os.makedirs(tmp_path / kind)
    shutil.copy(os.path.join(saved[kind], "tokenizer.json"), tmp_path / kind)
    bare, full = load_tokenizer(str(tmp_path / kind)), load_tokenizer(saved[kind])
    assert bare.special_ids == full.special_ids and bare.sentinel_ids == full.sentinel_ids
    assert bare.unk_id == full.unk_id
    assert bare.encode(SAMPLES[0]).tolist() == full.encode(SAMPLES[0]).tolist()
  # special_tokens_map.json: AddedToken dicts, and a null that removes a name's fallback.
  with open(tmp_path / "bert" / "special_tokens_map.json", "w") as f:
    json.dump({"mask_token": {"content": "[SEP]", "lstrip": False}, "pad_token": None}, f)
  tok = load_tokenizer(str(tmp_path / "bert"))
  assert tok.mask_id == tok.sep_id and tok.pad_id is None and tok.cls_id is not None


def test_missing_tokenizer_json(tmp_path):
  """A directory without tokenizer.json: one line naming the path and what was expected."""
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError) as info:
    load_tokenizer(str(tmp_path))
  message = str(info.value)
  assert str(tmp_path) in message and "tokenizer.json" in message and "\n" not in message
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.json"))):
    load_tokenizer(str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="config.json.*is not a Hugging Face tokenizer.json"):
    load_tokenizer(str(tmp_path / "config.json"))


def test_convert_hf_copies_tokenizer(saved, tmp_path):
  """tools/convert_hf.py puts the tokenizer beside the weights: load_tokenizer(out_dir) works."""
  hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
  theirs = transformers.AutoTokenizer.from_pretrained(saved["gpt2"])
  cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(theirs),
                                n_positions=64, bos_token_id=theirs.bos_token_id,
                                eos_token_id=theirs.eos_token_id)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir, safe_serialization=True)
  theirs.save_pretrained(hf_dir)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"), f"--hf_dir={hf_dir}",
       f"--out_dir={out_dir}"], capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert {"model.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out_dir))
  converted = load_tokenizer(str(out_dir))
  assert converted.fingerprint == load_tokenizer(str(hf_dir)).fingerprint
  assert converted.special_ids == load_tokenizer(saved["gpt2"]).special_ids
  for text in SAMPLES:
    assert converted.encode(text).tolist() == theirs(text)["input_ids"]
    assert converted.decode(converted.encode(text)) == theirs.decode(
        theirs(text)["input_ids"], skip_special_tokens=True)
