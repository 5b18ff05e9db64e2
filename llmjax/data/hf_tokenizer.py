"""Hugging Face tokenizers: a checkpoint's tokenizer.json, read with the `tokenizers` library.

As transformers' `AutoTokenizer.from_pretrained(dir)`: `encode(text)` is `tok(text)["input_ids"]`,
with the post-processor's special tokens (BERT's [CLS] ... [SEP], T5's </s>) unless
`add_special_tokens=False`; `decode(ids)` is `tok.decode(ids, skip_special_tokens=True)`."""

import hashlib
import json
from typing import Sequence

import numpy as np
from etils import epath

from llmjax import paths
from llmjax.data.tokenizers import _Specials

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # the later one wins, as in HF
# Where the configs do not name a special token, these pieces stand for it if the vocabulary
# has them (transformers' BERT, GPT-2 and T5 tokenizer classes default to the same names).
FALLBACK_NAMES = {"pad": ("[PAD]", "<pad>"), "eos": ("</s>", "<|endoftext|>", "[EOS]"),
                  "bos": ("<s>", "<|endoftext|>", "[BOS]"),
                  "unk": ("[UNK]", "<unk>", "<|endoftext|>"),
                  "mask": ("[MASK]", "<mask>"), "cls": ("[CLS]",), "sep": ("[SEP]",)}
_WHITESPACE = frozenset(" \t\n\r\v\f")


def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet, character -> byte (printable bytes map to themselves)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  shifted = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(shifted)}}


def _types(node) -> set[str]:
  """Every "type" named in a tokenizer.json component, Sequences included."""
  if isinstance(node, dict):
    return {node.get("type")} | set().union(*map(_types, node.values()))
  if isinstance(node, list):
    return set().union(*map(_types, node))
  return set()


class HFTokenizer(_Specials):
  """A Hugging Face `tokenizer.json` (a file or a directory holding one) with llmjax's interface.

  Special ids come from tokenizer_config.json / special_tokens_map.json beside it where they
  name them (null: none), else FALLBACK_NAMES; sentinels are the `<extra_id_k>` pieces. The
  tokenizer.json pipeline is authoritative (transformers rebuilds some classes from defaults,
  which agree for checkpoints it wrote)."""

  def __init__(self, path: str):
    is_dir = paths.is_dir(path)  # gs://: its bucket checked, one line in seconds
    file = epath.Path(path) / TOKENIZER_FILE if is_dir else epath.Path(path)
    if is_dir and not file.is_file():
      raise ValueError(f"{path!r} has no {TOKENIZER_FILE}: expected a Hugging Face tokenizer "
                       f"directory or the path of a {TOKENIZER_FILE}")
    if not file.is_file():
      raise FileNotFoundError(f"Hugging Face tokenizer {str(file)!r} does not exist")
    config = {}
    for beside in (file.parent / name for name in CONFIG_FILES):
      if beside.is_file():
        config.update(json.loads(beside.read_text(encoding="utf-8")))
    self.spec = path
    self._load(file.read_text(encoding="utf-8"), config)

  def _load(self, text: str, config: dict) -> None:
    from tokenizers import AddedToken, Tokenizer
    self._text, self._config = text, config
    try:
      tok = self._tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust parser's errors are plain Exceptions
      raise ValueError(f"{self.spec!r} is not a Hugging Face tokenizer.json: {e}") from None
    # transformers turns both off unless a call asks for them; so must we, or ids get cut/padded.
    tok.no_truncation()
    tok.no_padding()
    model = json.loads(text)
    vocab = tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1

    def find(kind: str) -> int | None:
      if f"{kind}_token" not in config:
        return next((vocab[n] for n in FALLBACK_NAMES[kind] if n in vocab), None)
      named = config[f"{kind}_token"]  # a string, or a dict (an AddedToken) holding it
      return vocab.get(named.get("content") if isinstance(named, dict) else named)

    self.pad_id, self.eos_id, self.bos_id, self.unk_id, self.mask_id, self.cls_id, self.sep_id = (
        find(k) for k in ("pad", "eos", "bos", "unk", "mask", "cls", "sep"))
    self._find_sentinels(vocab.get)
    # transformers marks every named special token special in the backend, so decode drops it
    # and text that spells it encodes to its id; tokenizer.json files it did not write need this.
    ids = self.special_ids | ({self.unk_id} - {None})
    flagged = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    missing = [tok.id_to_token(i) for i in sorted(ids - flagged)]
    if missing:
      tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    self.fingerprint = "hf:" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    # transformers 5 ignores clean_up_tokenization_spaces for BPE models unless forced.
    forced = config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
        model["model"].get("type") != "BPE" or bool(forced))
    self._word_tables(model, vocab, flagged | ids)

  def _word_tables(self, model: dict, vocab: dict[str, int], special: set[int]) -> None:
    """Per id: does the piece open with whitespace (or not continue a word), end with it?"""
    kind = model["model"].get("type")
    prefix = model["model"].get("continuing_subword_prefix") or "##"
    byte_level = "ByteLevel" in _types(model.get("pre_tokenizer")) | _types(model.get("decoder"))
    to_byte = _byte_decoder()
    begins_V, ends_V = np.zeros(self.vocab_size, bool), np.zeros(self.vocab_size, bool)
    for piece, i in vocab.items():
      if i in special:
        begins_V[i] = ends_V[i] = True
        continue
      if kind == "WordPiece":  # BERT's whole words: every piece but the ## continuations
        begins_V[i] = not piece.startswith(prefix)
        continue
      if byte_level:
        piece = "".join(chr(to_byte.get(c, 0x41)) for c in piece)  # only whitespace matters
      elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        piece = chr(int(piece[3:5], 16))  # a SentencePiece byte-fallback piece
      piece = piece.replace("\u2581", " ")  # SentencePiece's (Metaspace's) word boundary
      begins_V[i] = piece[:1] in _WHITESPACE
      # A space opens the word after it (GPT-2's " ação" may be "Ġ" + "ação"); a newline or a
      # tab stands alone, so the piece after one starts a word of its own.
      ends_V[i] = piece[-1:] in _WHITESPACE - {" "}
    self._begins_V, self._ends_V = begins_V, ends_V

  def __getstate__(self):  # the Rust tokenizer is rebuilt from its JSON in worker processes
    return {"text": self._text, "config": self._config, "spec": self.spec}

  def __setstate__(self, state):
    self.spec = state["spec"]
    self._load(state["text"], state["config"])

  def __repr__(self):
    return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

  def encode_batch(self, texts: Sequence[str], *,
                   add_special_tokens: bool = True) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    text = self._tok.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=True)
    if self._clean_up:  # transformers' clean_up_tokenization, verbatim
      for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                            (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                            (" 're", "'re")):
        text = text.replace(before, after)
    return text

  def word_starts(self, ids) -> np.ndarray:
    """True where a word begins: a piece opening with whitespace (WordPiece: not "##"), or one
    after a newline, a tab or a special token; special tokens are words of their own."""
    ids = np.asarray(ids)
    after_V = np.concatenate([[True], self._ends_V[ids[:-1]]]) if ids.size else ids.astype(bool)
    return self._begins_V[ids] | after_V
