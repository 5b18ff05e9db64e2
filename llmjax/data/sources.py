"""Document sources: random-access sequences of documents that Grain reads by index.

Every source has `len(source)`, `source[i]` (a `str`, or an int array for pre-tokenized
ArrayRecord shards) and `sizes` (bytes or tokens per document, for splitting). Text files are
indexed once (document offsets only) and read through mmap, so a source costs a few bytes per
document of memory, pickles cheaply into worker processes, and reads any document in O(1).

`open_source` picks TextSource, JsonlSource or ArrayRecordSource (shards of
tools/tokenize_corpus.py) by a path's extension, `builtin_source()` reads this Python's standard
library, and `split_source` makes (train, validation) views. Text and JSONL files may be gs:// URLs,
copied once per process to local disk; ArrayRecord shards must be local (array_record reads gs://
only through TensorFlow): copy them first.
"""

import codecs
import functools
import glob
import json
import mmap
import os

import numpy as np
from absl import logging

from llmjax import paths

SPLITS = ("line", "paragraph", "file", "chunk")
CHUNK_BYTES = 1024  # split="chunk": documents are runs of whole lines of about this many bytes
WHITESPACE = b" \t\n\r\v\f"  # the bytes of a blank line or document
# Modules whose .py sources every CPython 3.10+ ships: the corpus that needs no download.
STDLIB_FILES = ("argparse.py", "ast.py", "collections/__init__.py", "dataclasses.py", "difflib.py",
                "enum.py", "functools.py", "inspect.py", "os.py", "shutil.py", "subprocess.py",
                "textwrap.py", "threading.py", "typing.py")


def expand_paths(patterns: str | list[str] | tuple[str, ...]) -> list[str]:
  """Files named by paths, glob patterns or comma-separated lists of them, each matching."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p]
  if not patterns:
    raise ValueError("no data files given")
  paths.check_buckets(patterns)  # an unreachable bucket: one line in seconds, not retries
  found = []
  for pattern in patterns:
    if paths.is_dir(pattern):
      raise ValueError(f"{pattern!r} is a directory; give files or a glob such as {pattern}/*.txt")
    matches = sorted(p for p in paths.glob(pattern) if paths.is_file(p))
    if not matches:
      what = "matches no file" if glob.has_magic(pattern) else "does not exist"
      raise FileNotFoundError(f"data path {pattern!r} {what}")
    found.extend(matches)
  return found


def check_path(path: str, name: str = "data.path") -> None:
  """Raises FileNotFoundError naming a comma-separated part of `path` that matches nothing."""
  if path == "builtin":
    return
  patterns = [p for p in str(path).split(",") if p]
  if not patterns:
    raise ValueError(f"{name}={path!r} names no file")
  paths.check_buckets(patterns)
  for pattern in patterns:
    if not (paths.is_dir(pattern) or any(paths.is_file(p) for p in paths.glob(pattern))):
      what = "matches no file" if glob.has_magic(pattern) else "does not exist"
      where = f"{name}={path!r}" if pattern == path else f"{name}={path!r}: {pattern!r}"
      raise FileNotFoundError(f"{where} {what}")


TEXT_CHECK_BYTES = 1 << 16  # how much of each text file is looked at before it is indexed
_BLOCK = 1 << 24  # bytes per step when scanning a file, so memory stays bounded
_HAS_TEXT = ~np.isin(np.arange(256), list(WHITESPACE))


def _invalid_utf8(data, final: bool = True) -> int:
  """How many invalid UTF-8 sequences `data` holds (real U+FFFD characters are not errors)."""
  decoder, bad = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
  for start in range(0, len(data), _BLOCK):
    block = data[start:start + _BLOCK]
    bad += decoder.decode(block, final=final and start + _BLOCK >= len(data)).count("\ufffd")
    bad -= block.count("\ufffd".encode())
  return bad


def check_text(data, path: str) -> None:
  """Raises ValueError when the first TEXT_CHECK_BYTES of `path` are not text: NUL bytes
  (over 1 in 1000, so a stray one passes) or over 30% invalid UTF-8 (random or compressed
  bytes are ~40%; Latin-1 prose a few %). An executable or an archive is refused, not learned."""
  head = bytes(data[:TEXT_CHECK_BYTES])
  nuls = head.count(0)
  if nuls * 1000 > len(head):
    raise ValueError(f"{path} is not a text file: {nuls:,} of its first {len(head):,} bytes are "
                     f"NUL (a binary, or UTF-16 text?); expected UTF-8 text")
  bad = _invalid_utf8(head, final=False)
  if bad > 0.3 * len(head):
    raise ValueError(f"{path} is not a text file: {bad / len(head):.0%} of its first "
                     f"{len(head):,} bytes are invalid UTF-8 (a binary or compressed file?); "
                     f"expected UTF-8 text")


def _check_file(data, path: str) -> None:
  check_text(data, path)
  bad = _invalid_utf8(data)
  if bad > 0:
    logging.warning("%s: %d invalid UTF-8 sequence(s); each is read as U+FFFD", path, bad)


def _map_file(path: str):
  """The file's bytes, memory-mapped (b"" for an empty file, which mmap refuses)."""
  with open(path, "rb") as fh:
    if os.fstat(fh.fileno()).st_size == 0:
      return b""
    return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def _document_spans(data, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends) byte offsets of the non-blank documents of one file; CRLF ends lines too."""
  arr = np.frombuffer(data, np.uint8) if len(data) else np.zeros(0, np.uint8)
  if split == "file":
    has_text = any(_HAS_TEXT[arr[i:i + _BLOCK]].any() for i in range(0, len(arr), _BLOCK))
    return (np.array([0]), np.array([len(arr)])) if has_text else (np.zeros(0, int),) * 2
  newlines = np.flatnonzero(arr == ord("\n"))
  starts = np.concatenate([[0], newlines + 1])
  ends = np.concatenate([newlines, [len(arr)]])
  if len(starts) and starts[-1] == len(arr):  # nothing after the last newline
    starts, ends = starts[:-1], ends[:-1]
  # A line has text if any of its bytes does; an empty line's reduce sees its newline (space).
  has_text = np.logical_or.reduceat(_HAS_TEXT[arr], starts) if len(starts) else np.zeros(0, bool)
  ends = ends - ((ends > starts) & (arr[np.maximum(ends - 1, 0)] == ord("\r")))
  if split == "line":
    return starts[has_text], ends[has_text]
  if split == "chunk":  # cut after the line that ends nearest past each multiple of CHUNK_BYTES
    cuts = np.unique(np.searchsorted(ends, np.arange(CHUNK_BYTES, len(arr), CHUNK_BYTES)))
    first = np.concatenate([[0], cuts + 1])
    first = first[first < len(starts)]
    keep = np.logical_or.reduceat(has_text, first) if len(first) else np.zeros(0, bool)
    # A chunk runs to the next one's start: every byte, newlines included, is in one chunk.
    chunk_ends = np.concatenate([starts[first][1:], [len(arr)]])
    return starts[first][keep], chunk_ends[keep]
  # Paragraphs: maximal runs of consecutive non-blank lines.
  first = has_text & ~np.concatenate([[False], has_text[:-1]])
  last = has_text & ~np.concatenate([has_text[1:], [False]])
  return starts[first], ends[last]


class _SpanSource:
  """Documents at byte spans `_spans[i] = (file, start, end)` of (local copies of) files, read
  through mmaps opened on first use; pickles without them (worker processes reopen)."""

  def __init__(self, patterns):
    self.paths = expand_paths(patterns)
    self._local, self._maps = [paths.local_copy(p) for p in self.paths], {}

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, i: int) -> str:
    f, start, end = (int(x) for x in self._spans[int(i)])
    if f not in self._maps:
      self._maps[f] = _map_file(self._local[f])
    return self._maps[f][start:end].decode("utf-8", errors="replace")

  def __getstate__(self):
    return {**self.__dict__, "_maps": {}}


class TextSource(_SpanSource):
  """Documents of UTF-8 text files: one per line, paragraph, file, or chunk of whole lines of
  about CHUNK_BYTES (one long text made shufflable); blank ones skipped."""

  def __init__(self, patterns, split: str = "line"):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    super().__init__(patterns)
    self.split, spans = split, []
    for f, path in enumerate(self.paths):
      data = _map_file(self._local[f])
      _check_file(data, path)
      starts, ends = _document_spans(data, split)
      spans.append(np.stack([np.full(len(starts), f), starts, ends], axis=1))
      del data  # the index keeps offsets only
    self._spans = np.concatenate(spans).astype(np.int64)
    self.sizes = self._spans[:, 2] - self._spans[:, 1]
    if len(self) == 0:
      raise ValueError(f"no text in {self.paths}: every file is empty or blank")

  def __repr__(self):
    return f"TextSource({len(self.paths)} files, {len(self)} documents by {self.split})"


class JsonlSource(_SpanSource):
  """Documents from one string field of JSON-lines files; lines without it are reported.
  Given `check_record` (record -> problem or None), documents are whole records (dicts), and
  the first bad line raises ValueError("PATH:LINE: problem"): fine-tuning data is never
  skipped silently. `sizes` are then the lines' bytes."""

  MAX_REPORTED = 5

  def __init__(self, patterns, field: str = "text", check_record=None):
    super().__init__(patterns)
    self.field, records, sizes, problems = field, [], [], []
    self.records = check_record is not None
    for f, path in enumerate(self.paths):
      with open(self._local[f], "rb") as fh:
        data = fh.read()
      _check_file(data, path)
      offset = 0
      for line_no, line in enumerate(data.split(b"\n"), 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
          continue
        problem = None
        try:
          record = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
          problem = f"not JSON ({e.msg} at column {e.colno})"
        if problem is None and not isinstance(record, dict):
          problem = f"not a JSON object but a {type(record).__name__}"
        elif problem is None and self.records:
          problem = check_record(record)
        elif problem is None:
          value = record.get(field)
          if not isinstance(value, str) or not value.strip():
            problem = (f"no field {field!r}" if value is None else f"field {field!r} is blank"
                       if isinstance(value, str) else f"field {field!r} is {type(value).__name__}")
        if problem and self.records:
          raise ValueError(f"{path}:{line_no}: {problem}")
        if problem:
          problems.append(f"{path}:{line_no}: {problem}")
          continue
        records.append((f, start, offset - 1))
        sizes.append(len(line) if self.records else len(value.encode("utf-8")))
    for problem in problems[:self.MAX_REPORTED]:
      logging.warning("skipped %s", problem)
    if problems:
      logging.warning("JsonlSource skipped %d of %d lines without text in field %r (%s)",
                      len(problems), len(problems) + len(records), field,
                      "first shown above" if len(problems) <= self.MAX_REPORTED else
                      f"first {self.MAX_REPORTED} shown above")
    self.skipped = problems
    if not records:
      raise ValueError(f"{self.paths} hold no JSON record" if self.records else
                       f"no line of {self.paths} has a string field {field!r}"
                       + (f"; first problem: {problems[0]}" if problems else ""))
    self._spans, self.sizes = np.asarray(records, np.int64), np.asarray(sizes)

  def __getitem__(self, i: int) -> str | dict:
    record = json.loads(super().__getitem__(i))
    return record if self.records else record[self.field]

  def __repr__(self):
    what = "records" if self.records else f"documents, field={self.field!r}"
    return f"JsonlSource({len(self.paths)} files, {len(self)} {what})"


class ArrayRecordSource:
  """ArrayRecord shards: token arrays given a `meta.json` (tools/tokenize_corpus.py), else text."""

  def __init__(self, patterns):
    import grain
    named = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    url = next((p for p in named if paths.is_url(p)), None)
    if url:  # its reader hangs on a URL: only TensorFlow's file systems teach it gs://
      raise ValueError(f"ArrayRecord shards cannot be read from {url}: array_record reads "
                       f"local files only; copy them to a local disk first")
    if isinstance(patterns, str) and os.path.isdir(patterns):
      patterns = os.path.join(patterns, "*.array_record")
    self.paths = expand_paths(patterns)
    metas = {}
    for directory in sorted({os.path.dirname(p) for p in self.paths}):
      meta_path = os.path.join(directory, "meta.json")
      metas[directory] = json.load(open(meta_path)) if os.path.isfile(meta_path) else None
    kinds = {None if m is None else m.get("fingerprint", m["tokenizer"]) for m in metas.values()}
    if len(kinds) > 1:
      raise ValueError(f"the shards {sorted(metas)} were written by different tokenizers "
                       f"(or some as text): {sorted(map(str, kinds))}; read them separately")
    self.meta = next(iter(metas.values()))
    # The shards' tokenizer and its fingerprint (the pipeline's must equal it); None for text.
    self.tokenizer = self.meta["tokenizer"] if self.meta else None
    self.tokenizer_fingerprint = self.meta.get("fingerprint", self.tokenizer) if self.meta else None
    self._dtype = np.dtype(self.meta["dtype"]) if self.meta else None
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    if len(self._source) == 0:
      raise ValueError(f"the ArrayRecord shards {self.paths} hold no records")
    # Shard order is the sorted path order, as written: one sizes file per directory, used
    # when all of its shards are read.
    every = self.meta and all(os.path.isfile(os.path.join(d, "sizes.npy")) and len(m["shards"])
                              == sum(os.path.dirname(p) == d for p in self.paths)
                              for d, m in metas.items())
    self._sizes = (np.concatenate([np.load(os.path.join(d, "sizes.npy")) for d in sorted(metas)])
                   if every else None)

  @property
  def sizes(self) -> np.ndarray:
    """Tokens (or bytes) per document: from sizes.npy if written, else read once."""
    if self._sizes is None:
      itemsize = self._dtype.itemsize if self._dtype is not None else 1
      self._sizes = np.array([len(self._source[i]) // itemsize for i in range(len(self))])
    return self._sizes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    record = self._source[int(i)]
    if self._dtype is None:
      return record.decode("utf-8", errors="replace")
    return np.frombuffer(record, self._dtype).astype(np.int32)

  def __repr__(self):
    kind = f"tokens of {self.tokenizer}" if self.meta else "text"
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} documents, {kind})"


def builtin_source(split: str = "paragraph") -> TextSource:
  """The sources of STDLIB_FILES in this Python's install (about 1 MB): a corpus everywhere."""
  root = os.path.dirname(os.__file__)
  paths = [p for p in (os.path.join(root, n) for n in STDLIB_FILES) if os.path.isfile(p)]
  if not paths:  # a stripped install may lack them
    raise FileNotFoundError(f"no standard-library sources under {root}; give data files instead")
  return TextSource(paths, split=split)


class SubsetSource:
  """A view of some documents of a source, the last one possibly cut to its first `head` bytes
  or tokens, the first to those from `tail` on."""

  def __init__(self, source, indices: np.ndarray, head: int | None = None, tail: int | None = None):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.head, self.tail = head, tail
    self.records = getattr(source, "records", False)  # documents are dicts: never cut
    self.tokenizer = getattr(source, "tokenizer", None)
    self.tokenizer_fingerprint = getattr(source, "tokenizer_fingerprint", None)

  def __len__(self) -> int:
    return len(self.indices)

  def __repr__(self):
    return f"{self.source!r}[{len(self)} of {len(self.source)} documents]"

  @functools.cached_property
  def sizes(self) -> np.ndarray:
    sizes = np.asarray(self.source.sizes)[self.indices].copy()
    for i in {0, len(self) - 1} if (self.head, self.tail) != (None, None) else ():
      doc = self[i]  # only a cut document is read
      sizes[i] = len(doc.encode("utf-8") if isinstance(doc, str) else doc)
    return sizes

  def __getitem__(self, i: int):
    i = int(i)
    doc = self.source[int(self.indices[i])]
    if self.head is not None and i == len(self) - 1:
      return _cut(doc, self.head)[0]
    if self.tail is not None and i == 0:
      return _cut(doc, self.tail)[1]
    return doc


def _cut(doc, at: int):
  """(doc[:at], doc[at:]) by bytes for text (moved back to a character boundary) or by tokens."""
  if not isinstance(doc, str):
    return doc[:at], doc[at:]
  data = doc.encode("utf-8")
  while 0 < at < len(data) and (data[at] & 0xC0) == 0x80:
    at -= 1
  return data[:at].decode("utf-8"), data[at:].decode("utf-8")


def split_source(source, validation_fraction: float = 0.05, *, method: str = "tail",
                 seed: int = 0) -> tuple[SubsetSource, SubsetSource]:
  """(train, validation) views of `source`, the same on every machine and every run.

  "tail": validation is the last `validation_fraction` of the corpus by size, cutting the
  boundary document in two (nanoGPT's split of one text file). "hash": each document goes to
  validation with probability `validation_fraction`, decided by `seed` and its index alone."""
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
  n = len(source)
  if method == "hash":
    is_val = np.random.default_rng(seed).random(n) < validation_fraction
    if is_val.all() or not is_val.any():
      raise ValueError(f"{source} has too few documents ({n}) to hold out "
                       f"{validation_fraction:.0%} of them; use method='tail'")
    return (SubsetSource(source, np.flatnonzero(~is_val)),
            SubsetSource(source, np.flatnonzero(is_val)))
  if method != "tail":
    raise ValueError(f"method={method!r}; expected 'tail' or 'hash'")
  sizes = np.asarray(source.sizes, np.int64)
  ends = np.cumsum(sizes)
  boundary = int(round(ends[-1] * (1.0 - validation_fraction)))
  if boundary <= 0 or boundary >= ends[-1] or getattr(source, "records", False) and n < 2:
    raise ValueError(f"{source} is too small ({ends[-1]} bytes/tokens) to split")
  doc = int(np.searchsorted(ends, boundary, side="left"))  # the document holding the boundary
  at = boundary - (ends[doc - 1] if doc else 0)
  if getattr(source, "records", False):  # a record is never cut: the nearest edge, in range
    doc = min(max(int(np.argmin(np.abs(ends - boundary))), 0), n - 2)
    at = sizes[doc]
  if at == sizes[doc]:  # the boundary falls between documents
    return (SubsetSource(source, np.arange(doc + 1)), SubsetSource(source, np.arange(doc + 1, n)))
  return (SubsetSource(source, np.arange(doc + 1), head=int(at)),
          SubsetSource(source, np.arange(doc, n), tail=int(at)))


def open_source(path: str, *, format: str | None = None, split: str = "line",
                field: str = "text", check_record=None):
  """The source `path` names: "builtin", text files, JSONL (.jsonl/.json) or ArrayRecord shards;
  `format` ("text", "jsonl", "array_record") overrides the guess from the file extension.
  `check_record` (fine-tuning): JSONL records, each checked (see JsonlSource)."""
  if path == "builtin" and check_record is None:
    return builtin_source(split)
  if format is None:
    first = path.split(",")[0]
    paths.check_bucket(first)  # before asking it whether `first` is a directory
    format = ("array_record" if first.endswith(".array_record") or paths.is_dir(first) else
              "jsonl" if first.endswith((".jsonl", ".json")) else "text")
  if check_record is not None and format != "jsonl":
    raise ValueError(f"fine-tuning reads JSON records, not {path!r} as {format}: give .jsonl "
                     f"files (or data.format='jsonl')")
  if format == "text":
    return TextSource(path, split=split)
  if format == "jsonl":
    return JsonlSource(path, field=field, check_record=check_record)
  if format == "array_record":
    return ArrayRecordSource(path)
  raise ValueError(f"format={format!r}; expected 'text', 'jsonl' or 'array_record'")


def check_readable(source, tokenizer) -> None:
  """Raises ValueError for an empty source, or one of token ids made by another tokenizer."""
  if len(source) == 0:
    raise ValueError(f"{source} holds no documents")
  made_with = getattr(source, "tokenizer_fingerprint", None)
  if made_with is not None and made_with != tokenizer.fingerprint:
    raise ValueError(f"{source} holds ids of tokenizer {source.tokenizer!r}, not of {tokenizer}; "
                     f"use that tokenizer, or tokenize the original text again")
