"""Input that is not a corpus is refused where it is opened, in one line naming the file: a
program or archive given as text, a missing data path, JSONL lines that are not JSON."""

import json
import logging as pylogging
import os
import shutil
import sys

import pytest

from llmjax import data
from llmjax.data import sources


def one_line_error(fn, *args, match: str, kind=ValueError, **kwargs):
  """fn(*args) raises `kind` whose message is one line holding `match` verbatim."""
  with pytest.raises(kind) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert match in message and "\n" not in message, message
  return message


@pytest.fixture
def program(tmp_path):
  """An executable (ls, or this Python) copied to corpus.txt / corpus.jsonl."""
  binary = "/bin/ls" if os.path.isfile("/bin/ls") else os.path.realpath(sys.executable)
  shutil.copy(binary, tmp_path / "corpus.txt")
  shutil.copy(binary, tmp_path / "corpus.jsonl")
  return str(tmp_path / "corpus.txt"), str(tmp_path / "corpus.jsonl")


def test_a_program_is_not_a_corpus(program):
  """Text sources, JSONL sources and the character vocabulary refuse a binary by name."""
  text, jsonl = program
  for split in sources.SPLITS:
    one_line_error(data.TextSource, text, split=split, match=f"{text} is not a text file")
  one_line_error(sources.open_source, text, match=f"{text} is not a text file")
  one_line_error(data.JsonlSource, jsonl, match=f"{jsonl} is not a text file")
  one_line_error(data.load_tokenizer, f"char:{text}", match=f"{text} is not a text file")


def test_random_bytes_without_nul_are_not_a_corpus(tmp_path):
  """Compressed-looking bytes (no NUL, mostly invalid UTF-8) are refused too."""
  noise = bytes(b % 255 + 1 for b in os.urandom(4096))
  (tmp_path / "noise.txt").write_bytes(noise)
  one_line_error(data.TextSource, str(tmp_path / "noise.txt"), match="invalid UTF-8")


def test_imperfect_text_is_still_text(tmp_path, caplog):
  """A stray NUL or some Latin-1 in real text passes (invalid bytes read as U+FFFD, warned)."""
  (tmp_path / "stray.txt").write_bytes(b"line one\nline\x00 two\n" + b"more text\n" * 200)
  assert len(data.TextSource(str(tmp_path / "stray.txt"))) == 202
  latin = "Le café était très animé; à côté, un garçon lisait.\n" * 50
  (tmp_path / "latin.txt").write_bytes(latin.encode("latin-1"))
  with caplog.at_level(pylogging.WARNING):
    assert len(data.TextSource(str(tmp_path / "latin.txt"))) == 50
  assert any("invalid UTF-8" in r.getMessage() for r in caplog.records)


def test_a_missing_data_path_says_so(tmp_path):
  """check_path names data.path and says the file is missing (or the glob matches nothing);
  "builtin", existing files, globs and shard directories pass."""
  missing = str(tmp_path / "x.txt")
  one_line_error(sources.check_path, missing, match=f"data.path={missing!r} does not exist",
                 kind=FileNotFoundError)
  (tmp_path / "a.txt").write_text("a\n")
  both = f"{tmp_path}/a.txt,{missing}"
  one_line_error(sources.check_path, both, match=f"data.path={both!r}: {missing!r} does not exist",
                 kind=FileNotFoundError)
  one_line_error(sources.check_path, f"{tmp_path}/*.jsonl", match="matches no file",
                 kind=FileNotFoundError)
  for good in ("builtin", f"{tmp_path}/a.txt", f"{tmp_path}/*.txt", str(tmp_path)):
    sources.check_path(good)
  # tokenizer 'char' reads one file: a glob, a list or the built-in corpus is not one.
  for several in (f"{tmp_path}/*.txt", both, "builtin", str(tmp_path)):
    one_line_error(data.load_tokenizer, f"char:{several}", match="is not one text file",
                   kind=FileNotFoundError)


def test_jsonl_lines_that_are_not_json_are_named_by_line(tmp_path, caplog):
  """An unparseable line is reported with its file, line number and JSON's reason."""
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"text": "good"}) + "\n{\"text\": \"cut off\n[1]\n")
  with caplog.at_level(pylogging.WARNING):
    source = data.JsonlSource(str(path))
  assert len(source) == 1
  assert source.skipped[0].startswith(f"{path}:2: not JSON (")
  assert source.skipped[1] == f"{path}:3: not a JSON object but a list"
  path.write_text("{oops\n")
  one_line_error(data.JsonlSource, str(path), match=f"{path}:1: not JSON")
