"""Shared corpora and batch checks for the pipeline tests (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np

from llmjax.data import ByteTokenizer
from llmjax.objectives import CausalLM, MaskedLM, PrefixLM, SpanCorruption

TOK = ByteTokenizer()
SEQ = 64  # sequence length of most tests; the "short" documents fit one window of it
OBJECTIVES = {"causal_lm": lambda n: CausalLM(TOK, n), "prefix_lm": lambda n: PrefixLM(TOK, n),
              "masked_lm": lambda n: MaskedLM(TOK, n),
              "span_corruption": lambda n: SpanCorruption(TOK, n)}


def write_lines(path, n, min_len, max_len, seed,
                 alphabet="abcdefghijklmnopqrstuvwxyz ,.") -> list[str]:
  """Writes n unique non-blank lines ("<index>:" + random text) to `path`; returns them."""
  rng = np.random.default_rng(seed)
  letters = np.array(list(alphabet))
  lines = [f"{i}:" + "".join(rng.choice(letters, rng.integers(min_len, max_len + 1)))
           for i in range(n)]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return lines


def take(ds, n: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first n batches of a pipeline (all of them if n is None), its iterator then closed."""
  it = iter(ds)
  out = list(it) if n is None else [next(it) for _ in range(n)]
  it.close()
  return out


def assert_batches_equal(a, b) -> None:
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    assert x.keys() == y.keys(), i
    for k in x:
      assert x[k].dtype == y[k].dtype, (i, k)
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {i}, key {k}")


def segment_spans(segment_ids_row: np.ndarray) -> list[tuple[int, int]]:
  """[start, end) of each segment of a row; asserts ids run 1, 2, ... then padding."""
  ids = segment_ids_row.tolist()
  k = sum(1 for i, s in enumerate(ids) if s > 0 and (i == 0 or ids[i - 1] != s))
  spans = []
  for s in range(1, k + 1):
    where = np.flatnonzero(segment_ids_row == s)
    assert len(where), f"segment {s} missing from {ids}"
    assert where[-1] - where[0] + 1 == len(where), f"segment {s} not contiguous in {ids}"
    spans.append((int(where[0]), int(where[-1]) + 1))
  end = spans[-1][1] if spans else 0
  assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:])), f"gap between segments: {ids}"
  assert (not spans or spans[0][0] == 0) and not np.any(segment_ids_row[end:]), ids
  return spans


def documents(batches) -> list[str]:
  """The documents of CausalLM batches whose every document fits one window, in row order."""
  docs = []
  for b in batches:
    for row in range(len(b["tokens"])):
      for s, e in segment_spans(b["segment_ids"][row]):
        assert b["tokens"][row, s] == TOK.bos_id and b["targets"][row, e - 1] == TOK.eos_id
        docs.append(TOK.decode(b["tokens"][row, s:e]))
  return docs
