"""Tests of JSONL record sources (fine-tuning data): every line checked, errors name file:line."""

import json
import pickle

import numpy as np
import pytest

from llmjax.data import ByteTokenizer, make_pipeline
from llmjax.data.sources import JsonlSource, TextSource, open_source, split_source
from llmjax.objectives import CausalLM, Classification


def _needs_label(record):
  return None if "label" in record else "no field 'label'"


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_records_are_whole_dicts_with_line_sizes(tmp_path):
  lines = ['{"text": "a", "label": 1}', "", '{"text": "bb", "label": 0, "extra": [1]}']
  path = _write(tmp_path / "a.jsonl", lines)
  source = open_source(path, check_record=_needs_label)
  assert isinstance(source, JsonlSource) and source.records and len(source) == 2
  assert source[0] == {"text": "a", "label": 1}
  assert source[1] == {"text": "bb", "label": 0, "extra": [1]}
  assert source.sizes.tolist() == [len(lines[0]), len(lines[2])]
  assert "2 records" in repr(source)
  again = pickle.loads(pickle.dumps(source))  # workers get it pickled, without check_record
  assert again[1] == source[1] and again.records
  # Without check_record: the text field, exactly as before.
  plain = open_source(path)
  assert not plain.records and [plain[0], plain[1]] == ["a", "bb"]


@pytest.mark.parametrize("bad,problem", [
    ('{"text": "x"', "not JSON"),
    ('[1, 2]', "not a JSON object but a list"),
    ('{"text": "x"}', "no field 'label'"),
])
def test_first_bad_line_raises_with_path_and_line(tmp_path, bad, problem):
  good = '{"text": "ok", "label": 0}'
  path = _write(tmp_path / "b.jsonl", [good, "", bad, bad])
  with pytest.raises(ValueError, match=f"^{path}:3: {problem}") as e:
    JsonlSource(path, check_record=_needs_label)
  assert "\n" not in str(e.value)
  second = _write(tmp_path / "c.jsonl", [good])
  with pytest.raises(ValueError, match=f"^{path}:3: "):  # named among several files
    open_source(f"{second},{path}", check_record=_needs_label)


def test_records_need_jsonl(tmp_path):
  text = _write(tmp_path / "t.txt", ["hello"])
  for path, kwargs in ((text, {}), ("builtin", {}), (_write(tmp_path / "d.jsonl", ["{}"]),
                                                     {"format": "text"})):
    with pytest.raises(ValueError, match="fine-tuning reads JSON records"):
      open_source(path, check_record=_needs_label, **kwargs)
  with pytest.raises(ValueError, match="hold no JSON record"):
    open_source(_write(tmp_path / "e.jsonl", [" "]), check_record=_needs_label)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.95])
def test_tail_split_never_cuts_a_record(tmp_path, fraction):
  lines = [json.dumps({"text": "x" * (i * 7 % 23 + 1), "label": i % 2}) for i in range(20)]
  source = JsonlSource(_write(tmp_path / "s.jsonl", lines), check_record=_needs_label)
  train, val = split_source(source, fraction)
  assert len(train) and len(val) and train.records and val.records
  assert [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))] == [
      json.loads(line) for line in lines]
  assert np.asarray(train.sizes).sum() + np.asarray(val.sizes).sum() == source.sizes.sum()


def test_pipeline_matches_records_with_record_objectives(tmp_path):
  source = JsonlSource(_write(tmp_path / "p.jsonl", ['{"text": "a", "label": 0}']),
                       check_record=_needs_label)
  with pytest.raises(ValueError, match="holds JSON records, which CausalLM does not read"):
    make_pipeline(source, ByteTokenizer(), CausalLM(ByteTokenizer(), 16), batch_size=1,
                  shard_index=0, shard_count=1)
  text = TextSource(_write(tmp_path / "t.txt", ["hello"]))
  objective = Classification(ByteTokenizer(), 16, architecture="encoder")
  with pytest.raises(ValueError, match="Classification reads JSON records: open the data with"):
    make_pipeline(text, ByteTokenizer(), objective, batch_size=1, shard_index=0, shard_count=1)
