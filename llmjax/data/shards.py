"""Tokenize a corpus once into ArrayRecord shards (on local disk: array_record reads local
files only) that ArrayRecordSource reads by index."""

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from llmjax import paths
from llmjax.data.progress import Progress
from llmjax.data.sources import check_readable


def check_output_dir(output_dir: str) -> None:
  """Raises ValueError unless `output_dir` is a local directory that is new or empty."""
  if paths.is_url(output_dir):
    raise ValueError(f"ArrayRecord shards cannot be written to {output_dir}: array_record "
                     f"reads local files only; give a local directory")
  if os.path.isdir(output_dir) and os.listdir(output_dir):
    raise ValueError(f"{output_dir} is not empty; give a new or empty directory")


def write_shards(source, tokenizer, output_dir: str, *, num_shards: int = 8,
                 show_progress: bool = True) -> dict:
  """Writes `source`'s documents, tokenized, to `num_shards` shards plus `meta.json` (returned).

  Document i goes to shard i * num_shards // len(source) (contiguous ranges, so a shard reads
  sequentially), as uint16 ids when the vocabulary fits, else int32, with `sizes.npy` (tokens
  per document). Every document is written, empty ones too, so indices match the source's."""
  from array_record.python import array_record_module as ar
  check_output_dir(output_dir)
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be positive")
  check_readable(source, tokenizer)
  num_shards = min(num_shards, len(source))
  # Written beside, then renamed: a directory with shards always has its meta.json.
  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".tokenizing-", dir=parent)
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  names = [f"shard-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
  writers = [ar.ArrayRecordWriter(os.path.join(staging, n), "group_size:1") for n in names]
  progress = Progress(f"tokenizing into {output_dir}", total=len(source)) if show_progress else None
  sizes = np.zeros(len(source), np.int64)
  try:
    for i in range(len(source)):
      document = source[i]
      ids = tokenizer.encode(document) if isinstance(document, str) else np.asarray(document)
      writers[i * num_shards // len(source)].write(ids.astype(dtype).tobytes())
      sizes[i] = len(ids)
      if progress:
        progress.update(1, nbytes=len(document.encode("utf-8")) if isinstance(document, str) else 0)
    for w in writers:
      w.close()
    meta = {"tokenizer": tokenizer.spec, "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
            "documents": len(source), "tokens": int(sizes.sum()), "source": repr(source),
            "shards": names}
    np.save(os.path.join(staging, "sizes.npy"), sizes)
    with open(os.path.join(staging, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
    if os.path.isdir(output_dir):
      os.rmdir(output_dir)
    os.rename(staging, output_dir)
  except BaseException:
    for w in writers:
      with contextlib.suppress(Exception):  # already closed, or the failure itself
        w.close()
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    if progress:
      progress.close()
  return meta
