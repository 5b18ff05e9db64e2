"""The input pipeline on Grain: documents -> tokens -> objective -> packed rows -> batches.

    source ─shard by process─▶ shuffle(seed) ─▶ repeat ─▶ tokenize + objective.examples
           ─▶ flatten ─▶ pack | concat | pad ─▶ batch ─▶ objective.batch ─▶ [worker prefetch]

Everything random is keyed by the seed and the element's index, so the batches are a pure
function of the source, the arguments of `make_pipeline` (worker_count included: workers split
the documents among them) and the position: `iterator.get_state()` / `set_state()` (or Orbax
via `grain.checkpoint.CheckpointSave(iterator)`) resume it exactly, mid-epoch and mid-document.
A state saved under other arguments is refused, naming what differs.

With several processes and a finite `num_epochs`, processes run out of data after different
numbers of batches, and a multi-host step would hang. So by default each process then yields
empty batches (`is_padding(batch)`) forever; the trainer stops once every process's is padding.
"""

import atexit
import copy
import functools
import weakref
from typing import Any

import grain
import grain.experimental as gx
import numpy as np
from absl import logging

from llmjax.data.sources import check_readable

PACKINGS = ("pack", "concat", "pad")


def _to_examples(tokenizer, objective, document, rng: np.random.Generator) -> list[dict]:
  """A document's examples under `objective` (bound with functools.partial: workers pickle it);
  a record (dict) goes to the objective as it is: it tokenizes its fields itself."""
  if isinstance(document, dict):
    return objective.examples(document, rng)
  tokens = tokenizer.encode(document) if isinstance(document, str) else document
  return objective.examples(np.asarray(tokens, np.int32), rng)


class _Flatten(grain.experimental.FlatMapTransform):
  max_fan_out = 1 << 20

  def flat_map(self, examples):
    return examples


def _pad(lengths: dict[str, int], example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One example per row, padded to `lengths`, with the packer's segment ids and positions."""
  row = {}
  for key, length in lengths.items():
    real = np.arange(length) < len(example[key])
    row[key] = np.pad(example[key], (0, length - len(example[key])))
    row[key + "_segment_ids"] = real.astype(np.int32)
    row[key + "_positions"] = np.where(real, np.arange(length), 0).astype(np.int32)
  return row


def _fill_batch(batch_size: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Pads a short final batch with empty rows (segment 0, weight 0) so every batch has one shape."""
  short = batch_size - len(next(iter(batch.values())))
  if short == 0:
    return batch
  return {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)])
          for k, v in batch.items()}


def padding_batch(objective, batch_size: int) -> dict[str, np.ndarray]:
  """An all-padding batch of `objective` (segment ids 0, weights 0) with the real batches' keys."""
  return objective.batch({key + suffix: np.zeros((batch_size, length), np.int32)
                          for key, length in objective.lengths.items()
                          for suffix in ("", "_segment_ids", "_positions")})


def is_padding(batch: dict[str, Any]) -> bool:
  """True for a batch without a single real token (what a process yields after its data ends)."""
  key = "segment_ids" if "segment_ids" in batch else "encoder_segment_ids"
  return not np.any(np.asarray(batch[key]))


# Iterators their user did not close are closed at exit, letting go of the Grain iterators
# under them while their modules still exist (freed at teardown, they print tracebacks).
_OPEN = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
  for it in list(_OPEN):
    it.close()
    it._parents = ()


class _Guarded(grain.IterDataset):
  """The pipeline's last stage: states that carry their arguments, and padding after the end."""

  def __init__(self, parent, config: dict[str, Any], padding: dict[str, np.ndarray] | None):
    super().__init__(parent)
    self.config, self.padding = config, padding

  def __iter__(self):
    return _GuardedIterator(self._parent.__iter__(), self.config, self.padding)


class _GuardedIterator(grain.DatasetIterator):

  def __init__(self, parent, config, padding):
    super().__init__(parent)
    self.config, self.padding, self.exhausted = config, padding, False
    _OPEN.add(self)

  def __next__(self):
    if not self.exhausted:
      try:
        return next(self._parent)
      except StopIteration:
        if self.padding is None:
          raise
        self.exhausted = True
    return {k: v.copy() for k, v in self.padding.items()}

  def get_state(self):
    return {"pipeline": dict(self.config), "exhausted": self.exhausted,
            "parent": self._parent.get_state()}

  def set_state(self, state):
    saved = state.get("pipeline", {})
    differ = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in self.config.items()
              if saved.get(k) != v]
    if differ:
      raise ValueError(f"this data-iterator state was saved by a pipeline with other arguments: "
                       f"{', '.join(differ)}; resuming would skip or repeat data")
    self._parent.set_state(state["parent"])
    self.exhausted = bool(state["exhausted"])


class _Counted(grain.IterDataset):
  """Batches of `examples` examples each, packed first-fit-decreasing into `rows` rows of
  `lengths` (the format of Grain's packer: values, 1-based segment ids, positions). Examples
  that do not fit wait for the next batch, which takes them first: so a batch holds fewer
  only when its examples cannot fit, and nothing is dropped."""

  def __init__(self, parent, lengths: dict[str, int], rows: int, examples: int):
    super().__init__(parent)
    self.lengths, self.rows, self.examples = dict(lengths), rows, examples

  def __iter__(self):
    return _CountedIterator(self._parent.__iter__(), self.lengths, self.rows, self.examples)


class _CountedIterator(grain.DatasetIterator):

  def __init__(self, parent, lengths, rows, examples):
    super().__init__(parent)
    self.lengths, self.rows, self.examples = lengths, rows, examples
    self.waiting, self.read = [], 0  # (parent state before it, read number, example)

  def _read(self):
    before = copy.deepcopy(self._parent.get_state())  # states may be mutated in place
    self.read += 1
    return before, self.read - 1, next(self._parent)

  def __next__(self):
    self.fresh = self.read  # reads from here on are this batch's
    while len(self.waiting) < self.examples:
      try:
        self.waiting.append(self._read())
      except StopIteration:
        if not self.waiting:
          raise
        break
    used = np.zeros((self.rows, len(self.lengths)), np.int64)
    need = np.array([[len(ex[k]) for k in self.lengths] for _, _, ex in self.waiting])
    # Examples that waited go first, oldest first (none waits forever), then the longest.
    fresh = lambda i: self.waiting[i][1] >= self.fresh
    order = sorted(range(len(need)), key=lambda i: (fresh(i), -need[i].sum() if fresh(i) else i))
    placed, full = {}, np.array(list(self.lengths.values()))
    for i in order:
      if np.any(need[i] > full):
        raise ValueError(f"an example of {dict(zip(self.lengths, need[i].tolist()))} tokens is "
                         f"longer than the rows {self.lengths}")
      fits = np.flatnonzero(np.all(used + need[i] <= full, axis=1))
      if len(fits):
        placed[i] = fits[0]
        used[fits[0]] += need[i]
    batch, counts, filled = {}, np.zeros(self.rows, np.int32), np.zeros_like(used)
    for i in sorted(placed):
      row, example = placed[i], self.waiting[i][2]
      counts[row] += 1
      for j, (key, length) in enumerate(self.lengths.items()):
        if key not in batch:
          batch[key] = np.zeros((self.rows, length), example[key].dtype)
          batch[key + "_segment_ids"] = np.zeros((self.rows, length), np.int32)
          batch[key + "_positions"] = np.zeros((self.rows, length), np.int32)
        start = int(filled[row, j])
        end = filled[row, j] = start + need[i, j]
        batch[key][row, start:end] = example[key]
        batch[key + "_segment_ids"][row, start:end] = counts[row]
        batch[key + "_positions"][row, start:end] = np.arange(end - start)
    self.waiting = [w for i, w in enumerate(self.waiting) if i not in placed]
    return batch

  def get_state(self):
    # Where the first waiting example was read, how many were read since, which are waiting.
    if not self.waiting:
      return {"parent": self._parent.get_state(), "reads": 0, "waiting": []}
    first = self.waiting[0][1]
    return {"parent": self.waiting[0][0], "reads": self.read - first,
            "waiting": [w[1] - first for w in self.waiting]}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.waiting, self.read = [], 0
    for _ in range(state["reads"]):
      w = self._read()
      if w[1] in state["waiting"]:
        self.waiting.append(w)


def make_pipeline(source, tokenizer, objective, *, batch_size: int, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None, packing: str = "pack",
                  num_packing_bins: int | None = None, shard_index: int | None = None,
                  shard_count: int | None = None, worker_count: int = 0,
                  prefetch: int = 2, pad_after_end: bool | None = None,
                  shuffle_window: int = 0,
                  examples_per_batch: int | None = None) -> grain.IterDataset:
  """A Grain dataset of batches of `objective` made from `source`; `iter()` it to read.

  Args:
    source: a random-access document source (see data/sources.py).
    tokenizer: encodes text documents (pre-tokenized sources must have used the same one).
    objective: an object with `lengths`, `examples(tokens, rng)` and `batch(rows)`.
    batch_size: rows per batch on this process; a short last batch is filled with empty rows.
    seed: drives the shuffle, the objective's randomness and the packer's bin order.
    num_epochs: passes over the source; None repeats forever.
    packing: "pack" (first-fit packing of whole examples, with segment ids), "concat"
      (examples concatenated and cut into rows; causal LM only) or "pad" (one example per row).
    num_packing_bins: rows the packer fills at once (more: fuller rows); default 4 * batch_size.
    examples_per_batch: with "pack", batches of this many examples each (a batch size in
      examples, as a padded loader's), packed into batch_size rows; the examples that do not
      fit open the next batch. None: rows packed as full as they go.
    shard_index, shard_count: the share of documents to read; default: jax's process index, count.
    worker_count: processes that run the pipeline ahead of the trainer; 0: a thread of this one.
    prefetch: batches made ahead, per worker (0 with no workers: made on demand).
    shuffle_window: also shuffle examples within windows of this many (0: off), so the
      examples of a long document do not arrive in order.
    pad_after_end: after the last epoch, yield padding batches forever instead of stopping;
      default: when several processes share a finite number of epochs (see above)."""
  import jax  # only for the process index: the pipeline itself never touches devices
  if packing not in PACKINGS:
    raise ValueError(f"packing={packing!r}; expected one of {PACKINGS}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive")
  if examples_per_batch is not None and (packing != "pack" or examples_per_batch < 1):
    raise ValueError(f"examples_per_batch={examples_per_batch} needs packing='pack' (not "
                     f"{packing!r}) and a positive count")
  if packing == "concat" and not getattr(objective, "splittable", False):
    raise ValueError(f"packing='concat' cuts examples across rows, which {type(objective).__name__}"
                     f" examples do not survive; use packing='pack' or 'pad'")
  check_readable(source, tokenizer)
  reads_records = callable(getattr(objective, "check_record", None))
  if getattr(source, "records", False) != reads_records:
    raise ValueError(f"{type(objective).__name__} reads JSON records: open the data with "
                     f"open_source(..., check_record=objective.check_record)" if reads_records else
                     f"{source} holds JSON records, which {type(objective).__name__} does not read")
  num_packing_bins = num_packing_bins or 4 * batch_size
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
  if len(source) < shard_count:
    raise ValueError(f"{source} has {len(source)} documents, fewer than the {shard_count} "
                     f"processes that share it")

  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  example_seed = int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])
  ds = ds.random_map(functools.partial(_to_examples, tokenizer, objective), seed=example_seed)
  # One thread runs the whole pipeline ahead (below): faster than Grain's 16 reader threads
  # fighting over the GIL on a few cores.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = gx.FlatMapIterDataset(ds, _Flatten())
  if shuffle and shuffle_window > 1:
    ds = gx.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  if examples_per_batch:
    ds = _Counted(ds, objective.lengths, batch_size, examples_per_batch)
  elif packing == "pack":
    ds = gx.FirstFitPackIterDataset(ds, length_struct=dict(objective.lengths),
                                    num_packing_bins=num_packing_bins, seed=seed,
                                    shuffle_bins=shuffle)
  elif packing == "concat":
    ds = gx.ConcatThenSplitIterDataset(ds, length_struct=dict(objective.lengths))
  else:
    ds = ds.map(functools.partial(_pad, dict(objective.lengths)))
  if not examples_per_batch:
    ds = ds.batch(batch_size, drop_remainder=False).map(
        functools.partial(_fill_batch, batch_size))
  ds = ds.map(objective.batch)
  if worker_count:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; a notebook has none
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=prefetch))
  elif prefetch:
    ds = gx.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  if pad_after_end is None:
    pad_after_end = shard_count > 1 and num_epochs is not None
  config = {"documents": len(source), "objective": repr(objective), "batch_size": batch_size,
            "seed": seed, "shuffle": shuffle, "num_epochs": num_epochs, "packing": packing,
            "num_packing_bins": num_packing_bins, "shard_index": shard_index,
            "shard_count": shard_count, "worker_count": worker_count,
            "shuffle_window": shuffle_window, "examples_per_batch": examples_per_batch}
  ds = _Guarded(ds, config, padding_batch(objective, batch_size) if pad_after_end else None)
  logging.info("pipeline: %s, %s, %s packing, batch %d, shard %d/%d", source,
               type(objective).__name__, packing, batch_size, shard_index, shard_count)
  return ds


def fill(batch: dict[str, Any], key: str = "segment_ids") -> float:
  """The fraction of a batch's positions that hold tokens (not padding)."""
  return float(np.mean(np.asarray(batch[key]) > 0))
