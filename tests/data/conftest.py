"""Fixtures of the data tests: small corpora written into tmp_path."""

import pytest

from tests.data.common import write_lines


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
  """(path, lines): 200 ASCII documents of at most 56 bytes: BOS + doc + EOS fits a SEQ window."""
  path = tmp_path_factory.mktemp("short") / "short.txt"
  return str(path), write_lines(path, 200, 1, 52, seed=1)


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory):
  """(path, lines): 200 documents of 1-300 characters, some multi-byte: many span windows."""
  path = tmp_path_factory.mktemp("long") / "long.txt"
  return str(path), write_lines(path, 200, 1, 300, seed=2, alphabet="abcdefgh ijklmnop.,éß→")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
  """A 40-document file: 100 batches of 4 x 64 tokens run through it several times."""
  path = tmp_path_factory.mktemp("small") / "small.txt"
  write_lines(path, 40, 1, 300, seed=3, alphabet="abcdefgh ijklmnop.,éß→")
  return str(path)
