"""Tokenize a corpus once into ArrayRecord shards that ArrayRecordSource reads by index."""

from __future__ import annotations

import json
import os

import numpy as np

from llmjax.data.progress import Progress


def write_shards(source, tokenizer, output_dir: str, *, num_shards: int = 8,
                 show_progress: bool = True) -> dict:
  """Writes `source`'s documents, tokenized, to `num_shards` shards plus `meta.json`; returns the meta.

  Document i goes to shard i * num_shards // len(source) (contiguous ranges, so a shard reads
  sequentially), as uint16 ids when the vocabulary fits, else int32. Every document is
  written, empty ones too, so shard indices match the source's.
  """
  from array_record.python import array_record_module as ar
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be positive")
  if len(source) == 0:
    raise ValueError(f"{source} holds no documents")
  num_shards = min(num_shards, len(source))
  os.makedirs(output_dir, exist_ok=True)
  existing = [f for f in os.listdir(output_dir) if f.endswith(".array_record")]
  if existing:
    raise ValueError(f"{output_dir} already holds {len(existing)} shard(s); give an empty directory")
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  names = [f"shard-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
  writers = [ar.ArrayRecordWriter(os.path.join(output_dir, n), "group_size:1") for n in names]
  progress = Progress(f"tokenizing into {output_dir}", total=len(source)) if show_progress else None
  tokens = 0
  try:
    for i in range(len(source)):
      document = source[i]
      ids = tokenizer.encode(document) if isinstance(document, str) else np.asarray(document)
      writers[i * num_shards // len(source)].write(ids.astype(dtype).tobytes())
      tokens += len(ids)
      if progress:
        progress.update(1, nbytes=len(document) if isinstance(document, str) else 0)
  finally:
    for w in writers:
      w.close()
    if progress:
      progress.close()
  meta = {"tokenizer": tokenizer.spec, "fingerprint": tokenizer.fingerprint,
          "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "documents": len(source), "tokens": tokens,
          "source": repr(source), "shards": names}
  with open(os.path.join(output_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta
