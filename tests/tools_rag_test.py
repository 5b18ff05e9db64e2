"""tools/rag.py end to end on a tiny corpus: a tiny random BERT laid out as sentence-transformers
saves one retrieves, a tiny random GPT-2 answers; the index is reused only while it matches;
retrieval scores equal sentence-transformers'; bad input is one line."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmjax.evaluation import retrieval

from tests import hf_reference
from tests.evaluation.retrieval_test import random_texts, sentence_transformers_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "rag.py")


def _import_tool():
  """tools/rag.py as a module, once per process (its absl flags are defined once)."""
  if "tools_rag" not in sys.modules:
    spec = importlib.util.spec_from_file_location("tools_rag", TOOL)
    sys.modules["tools_rag"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["tools_rag"])
  return sys.modules["tools_rag"]


rag = _import_tool()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("rag")
  embedder = sentence_transformers_dir(str(root / "embedder"))
  generator = str(root / "generator")
  # Vocabulary 301, as the embedder's WordPiece tokenizer. Seed 1: a model whose greedy
  # continuations of these prompts are words, not [SEP]s that decode drops.
  hf_reference.make_gpt2(generator, seed=1)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
    shutil.copy(os.path.join(embedder, name), generator)
  passages = random_texts(8, seed=5, longest=6)
  (root / "corpus.txt").write_text("\n".join(passages) + "\n\n")  # a blank line is skipped
  return root, embedder, generator, passages


def test_end_to_end_and_index_reuse(setup):
  root, embedder, generator, passages = setup
  corpus, questions = str(root / "corpus.txt"), random_texts(2, seed=6, longest=4)
  proc = subprocess.run(
      [sys.executable, TOOL, f"--embedder={embedder}", f"--corpus={corpus}", "--k=2",
       f"--generator={generator}", "--max_new_tokens=4", *(f"--question={q}" for q in questions)],
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model, params, tokenizer = rag.load(embedder)
  top_Qk, scores_Qk = retrieval.search(
      retrieval.encode(model, params, tokenizer, questions), retrieval.encode(
          model, params, tokenizer, passages), 2)
  prompts = ["\n".join(passages[i] for i in top) + f"\n\nQuestion: {q}\nAnswer:"
             for q, top in zip(questions, top_Qk)]
  answers = rag.answer(*rag.load(generator), prompts, 4)
  expected = [f"wrote {corpus}.embeddings.npz: 8 passages"]
  for n, (q, top, scores, text) in enumerate(zip(questions, top_Qk, scores_Qk, answers), 1):
    expected += [f"=== question {n}/2: {q}"]
    expected += [f"[{r}] {s:.4f} passage {i}: {passages[i]}" for r, (i, s) in
                 enumerate(zip(top, scores), 1)]
    expected += [f"answer: {text}"]
  assert proc.stdout.splitlines() == expected
  assert all(answers)
  # The index the run wrote is reused here (another process, another batch size) ...
  vectors, reused = rag.index(model, params, tokenizer, passages, corpus + ".embeddings.npz",
                              batch_size=3)
  assert reused
  np.testing.assert_allclose(vectors, retrieval.encode(model, params, tokenizer, passages),
                             atol=1e-6)
  # ... but not for other passages, pooling, length or weights, which rewrite it.
  path, changed = corpus + ".embeddings.npz", passages[:-1] + ["w1 w2 w3"]
  assert not rag.index(model, params, tokenizer, changed, path)[1]
  assert rag.index(model, params, tokenizer, changed, path)[1]
  assert not rag.index(model, params, tokenizer, changed, path, pooling="cls")[1]
  assert not rag.index(model, params, tokenizer, changed, path, pooling="cls", max_length=4)[1]
  params = jax.tree.map(lambda x: x * 1.001, params)
  assert not rag.index(model, params, tokenizer, changed, path, pooling="cls", max_length=4)[1]


def test_scores_equal_sentence_transformers(setup, capsys):
  root, embedder, _, passages = setup
  queries = random_texts(12, seed=7)
  pairs = [{"query": q, "passage": passages[i % 8]} for i, q in enumerate(queries)]
  (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  results = rag.evaluate(embedder, str(root / "pairs.jsonl"), limit=10, compare=True)
  (ours, our_ranks, (q, p)), (theirs, their_ranks, _) = (
      results["llmjax"], results["sentence-transformers"])
  assert q.shape == (10, 64) and p.shape == (8, 64)  # repeated passages are one passage
  np.testing.assert_array_equal(our_ranks, their_ranks)
  assert ours == theirs and ours["recall@10"] == 1.0 and ours["recall@1"] < 1.0
  np.testing.assert_array_equal(our_ranks, retrieval.ranks(q, p, np.arange(10) % 8))
  rag.print_scores(results, "E")
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "10 queries, 8 distinct passages, embedder E"
  assert lines[2] == "llmjax" + " " * 18 + "".join(f"{ours[m]:11.4f}" for m in rag.METRICS)
  assert lines[3].startswith("sentence-transformers ") and lines[3][24:] == lines[2][24:]
  assert lines[4].startswith("ranks equal for 10 of 10 queries, the rest at most 0 apart")


def fails(*args) -> str:
  """The one line that tools/rag.py's main exits with for these flags."""
  rag.FLAGS.unparse_flags()
  rag.FLAGS.mark_as_parsed()  # flag by flag: parsing argv would also validate other tools'
  for arg in args:            # flags defined in this process (sweep.py's required --workdir)
    name, _, value = arg.removeprefix("--").partition("=")
    rag.FLAGS[name].parse(value)
  try:
    with pytest.raises(SystemExit) as e:
      rag.main(["rag.py"])
  finally:
    rag.FLAGS.unparse_flags()
  message = str(e.value)
  assert message.startswith("rag.py: ") and "\n" not in message, message
  return message


def test_bad_input(setup):
  root, embedder, generator, _ = setup
  corpus = str(root / "corpus.txt")
  (root / "empty.txt").write_text("\n \n")
  (root / "bad.jsonl").write_text('{"query": "w1", "passage": "w2"}\n{"query": "w1"}\n')
  assert "give --embedder" in fails(f"--corpus={corpus}", "--question=w1")
  assert "exactly one of --corpus" in fails(f"--embedder={embedder}")
  assert "no questions" in fails(f"--embedder={embedder}", f"--corpus={corpus}")
  assert "no text in" in fails(f"--embedder={embedder}", f"--corpus={root / 'empty.txt'}",
                               "--question=w1")
  assert "bad.jsonl:2 is not a JSON object of strings ('query', 'passage')" in fails(
      f"--embedder={embedder}", f"--eval_pairs={root / 'bad.jsonl'}")
  assert "not a directory" in fails(f"--embedder={root / 'nowhere'}", f"--corpus={corpus}",
                                    "--question=w1")
  assert "retrieval: k=9; expected 1..8" in fails(f"--embedder={embedder}", f"--corpus={corpus}",
                                                  "--question=w1", "--k=9")
  assert "the generator is a Bert; expected a GPT or T5" in fails(
      f"--embedder={embedder}", f"--corpus={corpus}", "--question=w1", f"--generator={embedder}")
  assert "embed: needs a Bert or T5" in fails(
      f"--embedder={generator}", f"--corpus={corpus}", "--question=w1",
      f"--index={root / 'gpt.npz'}")


def test_build_eval_tasks(tmp_path):
  """tools/build_eval_tasks.py (whose tasks rag.py reads) on a made-up WikiText-2 file."""
  from llmjax import data
  articles = [f" = Article {a} = \n \n" + "".join(
      " " + " . ".join(f"Article {a} paragraph {p} sentence {s} says something" for s in range(
          p + 1)) + " . \n" for p in range(4)) + " \n" for a in range(5)]
  (tmp_path / "wikitext2_valid.txt").write_text(" \n" + "".join(articles))
  (tmp_path / "tinyshakespeare.txt").write_text("".join(f"Line {i}: to be.\n" for i in range(99)))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "build_eval_tasks.py"),
       f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"], capture_output=True,
      text=True, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (tmp_path / "tinyshakespeare.txt").read_text()
  _, val = data.split_source(data.TextSource(str(tmp_path / "tinyshakespeare.txt"), "file"), 0.1)
  written = (tmp_path / "out" / "shakespeare_val.txt").read_text()
  assert written == val[0] and text.endswith(written) and abs(len(written) - len(text) / 10) <= 1
  sentence = "Article {} paragraph {} sentence {} says something.".format
  items = [json.loads(x) for x in (tmp_path / "out" / "wikitext_next_sentence.jsonl").open()]
  assert len(items) == 5 * 3  # one per paragraph of 2+ sentences
  for item in items:
    a, p = map(int, item["context"].split()[1:4:2])  # "Article A paragraph P sentence 0 ..."
    cut = item["context"].count(".")
    assert item["context"] == " ".join(sentence(a, p, s) for s in range(cut)) and cut <= p
    assert item["choices"][item["label"]] == sentence(a, p, cut)
    assert len(set(item["choices"])) == 4 and sum(c.startswith(f"Article {a} ")
                                                  for c in item["choices"]) == 1
  pairs = [json.loads(x) for x in (tmp_path / "out" / "wikitext_retrieval.jsonl").open()]
  assert pairs == [{"query": sentence(a, p, s), "passage": sentence(a, p, s + 1)}
                   for a in range(5) for p in range(4) for s in range(0, p, 2)]
  assert f"({len(items)} items)" in proc.stdout and f"({len(pairs)} pairs)" in proc.stdout
