"""Tokenizers with one interface: bytes (the default), SentencePiece, characters and Hugging
Face tokenizer.json (hf_tokenizer.py), picked by `load_tokenizer`'s spec; paths may be gs://.

All expose `encode(text) -> int32 array`, `encode_batch`, `decode`, `decode_batch`, `vocab_size`,
`spec` (what load_tokenizer takes), `fingerprint` (equal iff two give the same ids), the special
ids (`pad_id`, `eos_id`, `bos_id`, `unk_id`, `mask_id`, `cls_id`, `sep_id`, `sentinel_ids`; None
where the vocabulary lacks one), `special_ids` (never to be corrupted) and `word_starts(ids)`."""

import glob
import hashlib
import itertools
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np

from llmjax import paths
from llmjax.data.sources import WHITESPACE, check_text

SPECIALS = ("[PAD]", "[EOS]", "[BOS]", "[UNK]", "[MASK]", "[CLS]", "[SEP]")


def sentinel_piece(k: int) -> str:
  """The k-th sentinel's text, as in T5: `<extra_id_0>`, `<extra_id_1>`, ..."""
  return f"<extra_id_{k}>"


class _Specials:
  """Derived views of the special ids, shared by all tokenizers (which have none by default)."""
  pad_id = eos_id = bos_id = unk_id = mask_id = cls_id = sep_id = None
  sentinel_ids: tuple[int, ...] = ()

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids that are never text: padding, EOS/BOS, [MASK]/[CLS]/[SEP] and the sentinels."""
    ids = (self.pad_id, self.eos_id, self.bos_id, self.mask_id, self.cls_id, self.sep_id)
    return frozenset(i for i in ids if i is not None) | frozenset(self.sentinel_ids)

  def _find_sentinels(self, piece_id) -> None:
    """`sentinel_ids`: `<extra_id_0>`, `<extra_id_1>`, ... up to the first `piece_id` lacks."""
    self.sentinel_ids = ()
    while (i := piece_id(sentinel_piece(len(self.sentinel_ids)))) is not None:
      self.sentinel_ids += (i,)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode_batch(self, ids_batch) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]

  def require(self, **needs: bool) -> None:
    """Raises ValueError naming each special id an objective needs but this vocabulary lacks."""
    missing = [name for name, needed in needs.items() if needed and getattr(self, name) is None]
    if missing:
      raise ValueError(f"{self} has no {', '.join(missing)}; train the tokenizer with them "
                       f"(tools/train_tokenizer.py --bert_specials / --num_sentinels)")


class ByteTokenizer(_Specials):
  """UTF-8 bytes as tokens: the 7 SPECIALS at ids 0-6, byte b at 7 + b, then the sentinels."""

  def __init__(self, num_sentinels: int = 100):
    if num_sentinels < 0:
      raise ValueError(f"num_sentinels={num_sentinels} must be >= 0")
    (self.pad_id, self.eos_id, self.bos_id, self.unk_id, self.mask_id, self.cls_id,
     self.sep_id) = range(len(SPECIALS))
    self.offset = len(SPECIALS)
    self.sentinel_ids = tuple(range(self.offset + 256, self.offset + 256 + num_sentinels))
    self.vocab_size = self.offset + 256 + num_sentinels
    self.spec = "byte" if num_sentinels == 100 else f"byte:{num_sentinels}"
    self.fingerprint = f"byte:{num_sentinels}"

  def __repr__(self):
    return f"ByteTokenizer(num_sentinels={len(self.sentinel_ids)})"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    """Text of `ids`: padding, EOS and BOS are dropped, other specials written by name."""
    out, is_byte = [], lambda i: self.offset <= i < self.offset + 256
    for bytes_run, run in itertools.groupby(np.asarray(ids).reshape(-1).tolist(), is_byte):
      if bytes_run:
        out.append(bytes(i - self.offset for i in run).decode("utf-8", errors="replace"))
        continue
      out += [SPECIALS[i] if 0 <= i < self.offset else
              sentinel_piece(i - self.offset - 256) if self.offset + 256 <= i < self.vocab_size
              else "[UNK]" for i in run if i not in (self.pad_id, self.eos_id, self.bos_id)]
    return "".join(out)

  def word_starts(self, ids) -> np.ndarray:
    """True where a word begins: after whitespace, at whitespace, never inside a UTF-8 character."""
    b = np.asarray(ids) - self.offset
    space = np.isin(b, list(WHITESPACE))
    continuation = (b >= 0x80) & (b < 0xC0)
    return (space | np.concatenate([[True], space[:-1]])) & ~continuation


class SentencePieceTokenizer(_Specials):
  """A trained SentencePiece model; [MASK]/[CLS]/[SEP] and `<extra_id_k>` found by their pieces."""

  def __init__(self, path: str):
    if not paths.is_file(path):
      raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
    self._load(paths.path(path).read_bytes())
    self.spec = path

  def _load(self, proto: bytes) -> None:
    import sentencepiece as spm
    self._proto = proto
    self.fingerprint = "spm:" + hashlib.sha256(proto).hexdigest()[:16]
    sp = self._sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    self.vocab_size = sp.GetPieceSize()
    self.pad_id, self.eos_id, self.bos_id, self.unk_id = (
        None if i < 0 else i for i in (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()))
    self.mask_id, self.cls_id, self.sep_id = map(self._piece_id, ("[MASK]", "[CLS]", "[SEP]"))
    self._find_sentinels(self._piece_id)
    self._starts_V = np.array([sp.IdToPiece(i).startswith("\u2581") or sp.IsControl(i)
                               or sp.IsUnknown(i) for i in range(self.vocab_size)])

  def _piece_id(self, piece: str) -> int | None:
    i = self._sp.PieceToId(piece)
    return i if self._sp.IdToPiece(i) == piece and not self._sp.IsUnknown(i) else None

  def __getstate__(self):  # the processor itself does not pickle; worker processes reload it
    return {"proto": self._proto, "spec": self.spec}

  def __setstate__(self, state):
    self._load(state["proto"])
    self.spec = state["spec"]

  def __repr__(self):
    return f"SentencePieceTokenizer({self.spec!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self._sp.EncodeAsIds(list(texts))]

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([i for i in np.asarray(ids).reshape(-1).tolist() if i != self.pad_id])

  def word_starts(self, ids) -> np.ndarray:
    return self._starts_V[np.asarray(ids)]


class CharTokenizer(_Specials):
  """One id per character of a corpus (nanoGPT's shakespeare_char), in sorted order. No special
  ids (causal LM: `add_bos=False, add_eos=False`); an unknown character is an error naming it."""

  def __init__(self, path: str):
    if not paths.is_file(path):
      several = (paths.path(path).exists() or "," in path or glob.has_magic(path)
                 or path == "builtin")
      raise FileNotFoundError(
          f"character vocabulary source {path!r} is not one text file: 'char' takes the "
          f"characters of a single file" if several else
          f"character vocabulary source {path!r} does not exist")
    raw = paths.path(path).read_bytes()
    check_text(raw, path)  # a binary's bytes are no vocabulary
    self.chars = "".join(sorted(set(raw.decode("utf-8", errors="replace"))))  # keeps "\r"
    if not self.chars:
      raise ValueError(f"{path} is empty: no characters for a vocabulary")
    self._ids = {c: i for i, c in enumerate(self.chars)}
    self._space = np.array([c.isspace() for c in self.chars])
    self.vocab_size, self.spec = len(self.chars), f"char:{path}"
    self.fingerprint = "char:" + hashlib.sha256(self.chars.encode()).hexdigest()[:16]

  def __repr__(self):
    return f"CharTokenizer({len(self.chars)} characters)"

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._ids[c] for c in text), np.int32, len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in {self} ({self.spec})") from None

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).reshape(-1).tolist()
                   if 0 <= i < len(self.chars))

  def word_starts(self, ids) -> np.ndarray:
    space = self._space[np.asarray(ids, np.int64)]
    return space | np.concatenate([[True], space[:-1]])


def load_tokenizer(spec: str):
  """"byte" (100 sentinels), "byte:N" (N sentinels), "char:PATH" (the characters of a file), a
  SentencePiece .model path, or a Hugging Face tokenizer.json (or a checkpoint dir holding one)."""
  if spec.startswith("char:"):
    return CharTokenizer(spec[len("char:"):])
  if spec == "byte" or spec.startswith("byte:"):
    count = spec.partition(":")[2] if ":" in spec else "100"
    if not count.isdigit():
      raise ValueError(f"tokenizer {spec!r}: expected 'byte' or 'byte:N' with N sentinels")
    return ByteTokenizer(int(count))
  if paths.is_dir(spec) or spec.endswith(".json"):
    from llmjax.data.hf_tokenizer import HFTokenizer  # imports this module: no cycle at load
    return HFTokenizer(spec)
  if not spec.endswith(".model"):
    raise ValueError(f"tokenizer {spec!r}: expected 'byte', 'byte:N', 'char:PATH', a SentencePiece "
                     f".model path or a Hugging Face tokenizer.json (or its directory)")
  return SentencePieceTokenizer(spec)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
  """Raises ValueError if the tokenizer makes ids the model's embedding table has no row for."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f"{tokenizer} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                     f"{model_vocab_size}; raise the model's vocab_size to at least "
                     f"{tokenizer.vocab_size}")


def train_sentencepiece(texts: Iterable[str], model_prefix: str, *, vocab_size: int,
                        model_type: str = "unigram", num_sentinels: int = 0,
                        bert_specials: bool = False, byte_fallback: bool = True,
                        character_coverage: float = 0.9995, num_threads: int = 2,
                        **trainer_options) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` (each a sentence or line) and loads it.

  Ids 0-3 are pad, eos, bos, unk; then [MASK] [CLS] [SEP] if `bert_specials`, then the
  sentinels `<extra_id_0>`...: control symbols, so text spelling them encodes as ordinary text
  (as in T5) and decode drops them. Writes `model_prefix`.model and .vocab (gs://: trained
  locally, then copied). Lossless by default (no normalization, whitespace kept, unseen
  characters as UTF-8 bytes); e.g. normalization_rule_name="nmt_nfkc" gives T5's behaviour."""
  options = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False,
             "allow_whitespace_only_pieces": True, "max_sentence_length": 1 << 14,
             **trainer_options}
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type={model_type!r}; expected 'unigram' or 'bpe'")
  symbols = (["[MASK]", "[CLS]", "[SEP]"] if bert_specials else []) + [
      sentinel_piece(k) for k in range(num_sentinels)]
  if not paths.is_url(model_prefix):
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    prefix = model_prefix
  else:  # SentencePiece writes local files only
    paths.open_dir(paths.path(model_prefix).parent, "the directory of model_prefix")
    staging = tempfile.TemporaryDirectory(prefix="llmjax-spm-")
    prefix = os.path.join(staging.name, "spm")
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=symbols,
      num_threads=num_threads, minloglevel=2, **options)
  if prefix != model_prefix:
    with staging:
      for suffix in (".model", ".vocab"):
        paths.path(model_prefix + suffix).write_bytes(paths.path(prefix + suffix).read_bytes())
  return SentencePieceTokenizer(model_prefix + ".model")
