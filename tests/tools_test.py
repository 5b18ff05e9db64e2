"""The data tools end to end, as a researcher runs them: train a tokenizer, shard a corpus,
benchmark."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmjax import data, objectives
from llmjax.data import shards as shard_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(name, *args, check=True):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], env=env,
                        capture_output=True, text=True, timeout=300)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A JSONL corpus of ~2000 short documents (stdlib lines), one of them without the text field."""
  path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
  source = data.builtin_source("line")
  lines = [source[i] for i in range(2000)]
  with open(path, "w") as f:
    for i, line in enumerate(lines):
      f.write(json.dumps({"text": line} if i != 7 else {"title": line}) + "\n")
  return str(path), lines[:7] + lines[8:]


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("tok") / "spm")
  proc = run_tool("train_tokenizer.py", f"--input={corpus[0]}", f"--model_prefix={prefix}",
                  "--vocab_size=400", "--model_type=bpe", "--num_sentinels=20", "--bert_specials")
  assert "reading" in proc.stderr  # progress is shown while it reads
  assert "docs.jsonl:8" in proc.stderr  # the line without the field is reported by file:line
  return prefix + ".model"


def test_train_tokenizer(spm_model):
  """The trained model has the reserved ids, BERT specials and ordered sentinels, and
  round-trips text."""
  tok = data.load_tokenizer(spm_model)
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert None not in (tok.mask_id, tok.cls_id, tok.sep_id)
  assert len(tok.sentinel_ids) == 20 and len(set(tok.sentinel_ids)) == 20
  text = "def f(x):\n    return x  # \u00e9\u4e2d\U0001F600"
  assert tok.decode(tok.encode(text)) == text
  # Text that spells a special is text: only the objectives put special ids in.
  assert not set(tok.encode("see <extra_id_0> and [MASK] or [CLS]").tolist()) & tok.special_ids


def test_tokenize_corpus_round_trip(corpus, spm_model, tmp_path):
  """Shards hold every document, in order, as the tokenizer's ids; the pipeline reads them."""
  out = tmp_path / "shards"
  proc = run_tool("tokenize_corpus.py", f"--input={corpus[0]}", f"--tokenizer={spm_model}",
                  f"--output_dir={out}", "--num_shards=3")
  assert "tokenizing" in proc.stderr
  source = data.ArrayRecordSource(str(out))
  tok = data.load_tokenizer(spm_model)
  assert len(source) == len(corpus[1])
  for i in (0, 1, 500, len(source) - 1):
    np.testing.assert_array_equal(source[i], tok.encode(corpus[1][i]))
  it = iter(data.make_pipeline(source, tok, objectives.CausalLM(tok, 64), batch_size=2, prefetch=0))
  assert next(it)["tokens"].shape == (2, 64)
  it.close()
  with pytest.raises(ValueError, match="holds ids of tokenizer"):
    data.make_pipeline(source, data.ByteTokenizer(), objectives.CausalLM(data.ByteTokenizer(), 64),
                       batch_size=2)


def test_shards_keep_their_tokenizer_straight(tmp_path):
  """Token shards record sizes; shards of two tokenizers, or re-tokenizing ids, are refused."""
  docs = tmp_path / "docs.txt"
  docs.write_text("first line\nsecond, longer line\nthird \u00e9\n")
  source = data.TextSource(str(docs))
  byte, byte5 = data.ByteTokenizer(), data.ByteTokenizer(num_sentinels=5)
  shard_writer.write_shards(source, byte, str(tmp_path / "a"), num_shards=2, show_progress=False)
  shard_writer.write_shards(source, byte5, str(tmp_path / "b"), show_progress=False)
  shards = data.ArrayRecordSource(str(tmp_path / "a"))
  np.testing.assert_array_equal(shards.sizes, [len(byte.encode(source[i])) for i in range(3)])
  with pytest.raises(ValueError, match="different tokenizers"):
    data.ArrayRecordSource(f"{tmp_path}/a/*.array_record,{tmp_path}/b/*.array_record")
  with pytest.raises(ValueError, match="holds ids of tokenizer"):
    shard_writer.write_shards(shards, byte5, str(tmp_path / "c"), show_progress=False)
  assert not (tmp_path / "c").exists()  # nothing half-written is left behind


def test_tools_reject_bad_input(tmp_path):
  """A missing input or a non-empty output directory ends the tool with a one-line reason."""
  proc = run_tool("tokenize_corpus.py", f"--input={tmp_path}/nope*.txt",
                  f"--output_dir={tmp_path}/out", check=False)
  assert proc.returncode != 0 and "matches no file" in proc.stderr
  (tmp_path / "a.txt").write_text("hello\n")
  run_tool("tokenize_corpus.py", f"--input={tmp_path}/a.txt", f"--output_dir={tmp_path}/out")
  proc = run_tool("tokenize_corpus.py", f"--input={tmp_path}/a.txt",
                  f"--output_dir={tmp_path}/out", check=False)
  assert proc.returncode != 0 and "not empty" in proc.stderr
  proc = run_tool("train_tokenizer.py", f"--input={tmp_path}/missing.txt",
                  f"--model_prefix={tmp_path}/t", check=False)
  assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_bench_data_prints_every_objective():
  """The benchmark prints tokens/s and fill per pre-training objective (fine-tuning ones read
  JSON records, not its text) and the ratio to the trainer's rate."""
  proc = run_tool("bench_data.py", "--seconds_each=0.3", "--train_steps=2", "--seq_len=32",
                  "--batch_size=4")
  lines = proc.stdout.splitlines()
  assert any(line.startswith("trainer") for line in lines)
  for name in (n for n, cls in objectives.OBJECTIVES.items() if not hasattr(cls, "check_record")):
    row = next(line for line in lines if line.startswith(name)).split()
    rate, ratio = float(row[1].replace(",", "")), float(row[3])
    assert rate > 0 and ratio > 0


def test_bench_train_prints_both_frameworks_side_by_side(tmp_path):
  """A 3-step run of PyTorch's shakespeare_char and of llmjax's speedrun (its run goes the way
  the shakespeare_char one does, with another experiment) on a small text: whole-process
  seconds and a finite exact validation loss for each; (c)'s products in both; an unknown run
  or precision is refused before any work."""
  source = data.builtin_source("line")
  text = "".join(source[i] + "\n" for i in range(3000))
  (tmp_path / "text.txt").write_text(text, encoding="utf-8")
  proc = run_tool("bench_train.py", f"--data={tmp_path}/text.txt", "--steps=3",
                  "--speedrun_steps=3", "--runs=torch,speedrun")
  rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
  for run in ("torch", "speedrun"):
    seconds, loss = float(rows[run][1]), float(rows[run][2])
    assert seconds > 0 and 0 < loss < 6, proc.stdout
  proc = run_tool("bench_train.py", f"--data={tmp_path}/text.txt", "--runs=products",
                  "--product_rows=256", "--shape_dtypes=bfloat16")
  for framework in ("torch", "xla"):  # x@w, g@wT, xT@g, 1024^3: GF/s
    row = next(line.split() for line in proc.stdout.splitlines()
               if line.startswith(f"{framework} bfloat16"))
    assert len(row) == 6 and all(float(v) > 0 for v in row[2:]), proc.stdout
  proc = run_tool("bench_train.py", f"--data={tmp_path}/text.txt", "--runs=tf", check=False)
  assert proc.returncode != 0 and "unknown --runs tf" in proc.stderr.strip().splitlines()[-1]
  proc = run_tool("bench_train.py", f"--data={tmp_path}/text.txt", "--shape_dtypes=float16",
                  check=False)
  assert proc.returncode != 0 and "unknown --shape_dtypes float16; expected float32 or " \
      "bfloat16" in proc.stderr.strip().splitlines()[-1]
