"""evaluation.retrieval: scores against a brute-force ranking (ties included), and embeddings
of a tiny random BERT saved as sentence-transformers saves all-MiniLM-L6-v2 against
sentence-transformers' own, with the same rankings, whatever the batching."""

import json
import os

import numpy as np
import pytest

from llmjax import decode, hf
from llmjax.data import ByteTokenizer, load_tokenizer
from llmjax.evaluation import retrieval

from tests import hf_reference  # needs the test extra: torch (CPU) and transformers

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    f"w{i}" for i in range(hf_reference.VOCAB - 5)]


def sentence_transformers_dir(path: str, max_seq_length: int = 16) -> str:
  """A random tiny BertModel laid out as all-MiniLM-L6-v2's directory: a WordPiece tokenizer
  of the words w0..w295, mean pooling, Normalize, and a short max_seq_length."""
  from transformers import BertTokenizerFast
  hf_reference.make_bert_model(path)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(WORDS) + "\n")
  BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
  modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
  configs = {"modules.json": [{"idx": i, "name": str(i), "path": p,
                               "type": f"sentence_transformers.models.{t}"}
                              for i, (p, t) in enumerate(modules)],
             "1_Pooling/config.json": {"word_embedding_dimension": 64,
                                       "pooling_mode_mean_tokens": True},
             "sentence_bert_config.json": {"max_seq_length": max_seq_length}}
  os.makedirs(os.path.join(path, "1_Pooling"))
  for name, config in configs.items():
    with open(os.path.join(path, name), "w") as f:
      json.dump(config, f)
  return path


def random_texts(n: int, seed: int, longest: int = 24) -> list[str]:
  """Texts of 1..longest known words: some run past a max_seq_length of 16 tokens."""
  rng = np.random.default_rng(seed)
  return [" ".join(f"w{i}" for i in rng.integers(0, 290, rng.integers(1, longest + 1)))
          for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from sentence_transformers import SentenceTransformer
  path = sentence_transformers_dir(str(tmp_path_factory.mktemp("st")))
  return (*hf.load(path), load_tokenizer(path), SentenceTransformer(path, device="cpu"))


def brute_force_ranks(q_QD, p_PD, relevant):
  """Ranks by sorting (-score, index) pairs one query at a time."""
  return np.array([1 + sorted(range(len(p_PD)), key=lambda j: (-float(q @ p_PD[j]), j)).index(r)
                   for q, r in zip(q_QD, relevant)])


def test_score_equals_brute_force_with_ties():
  rng = np.random.default_rng(0)
  # Small integer vectors (exact dot products) and repeated passages: many exact ties.
  p_PD = rng.integers(-2, 3, (40, 4)).astype(np.float32)
  p_PD[20:30] = p_PD[:10]
  q_QD = rng.integers(-2, 3, (25, 4)).astype(np.float32)
  relevant = rng.integers(0, 40, 25)
  want = brute_force_ranks(q_QD, p_PD, relevant)
  np.testing.assert_array_equal(retrieval.ranks(q_QD, p_PD, relevant), want)
  scores = retrieval.score(q_QD, p_PD, relevant, ks=(1, 3, 10))
  assert scores == pytest.approx({"recall@1": np.mean(want <= 1), "recall@3": np.mean(want <= 3),
                                  "recall@10": np.mean(want <= 10), "mrr": np.mean(1 / want)})
  assert 0 < scores["recall@1"] < scores["recall@10"] < 1  # the case is not trivial
  top_Qk, s_Qk = retrieval.search(q_QD, p_PD, 7)
  for q, top, s in zip(q_QD, top_Qk, s_Qk):
    expected = sorted(range(40), key=lambda j: (-float(q @ p_PD[j]), j))[:7]
    np.testing.assert_array_equal(top, expected)
    np.testing.assert_array_equal(s, p_PD[expected] @ q)
  # Query i equal to passage i, all others lower: recall 1 at every k.
  unit = np.eye(6)
  assert retrieval.score(unit, unit, np.arange(6)) == {"recall@1": 1.0, "recall@5": 1.0,
                                                       "recall@10": 1.0, "mrr": 1.0}


def test_bad_input(tiny):
  model, params, tokenizer, _ = tiny
  q, p = np.ones((3, 4)), np.ones((5, 4))
  with pytest.raises(ValueError, match=r"relevant\[1\]=5 is not in \[0, 5\)"):
    retrieval.score(q, p, [0, 5, 1])
  with pytest.raises(ValueError, match=r"relevant is int64 \(2,\); expected 3 ints"):
    retrieval.score(q, p, np.array([0, 1]))
  with pytest.raises(ValueError, match=r"relevant is float64"):
    retrieval.ranks(q, p, np.array([0.0, 1.0, 2.0]))
  with pytest.raises(ValueError, match=r"vectors \(3, 4\), \(0, 4\); expected \[Q, D\]"):
    retrieval.score(q, np.zeros((0, 4)), [0, 0, 0])
  with pytest.raises(ValueError, match=r"vectors \(3, 4\), \(5, 3\)"):
    retrieval.search(q, np.ones((5, 3)), 1)
  with pytest.raises(ValueError, match=r"k=6; expected 1..5"):
    retrieval.search(q, p, 6)
  with pytest.raises(ValueError, match="encode: 0 texts"):
    retrieval.encode(model, params, tokenizer, [])
  with pytest.raises(ValueError, match="batch_size=0"):
    retrieval.encode(model, params, tokenizer, ["w1"], batch_size=0)


def test_encode_equals_sentence_transformers_and_ranks_agree(tiny):
  model, params, tokenizer, st = tiny
  queries, passages = random_texts(12, seed=1), random_texts(20, seed=2)
  assert tokenizer.encode(queries[0])[0] == 2  # the HF tokenizer adds [CLS] ... [SEP]
  assert max(len(tokenizer.encode(t)) for t in passages) > st.max_seq_length  # some are cut
  ours = [retrieval.encode(model, params, tokenizer, t, batch_size=5,
                           max_length=st.max_seq_length) for t in (queries, passages)]
  theirs = [st.encode(t, normalize_embeddings=True) for t in (queries, passages)]
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-5)
  relevant = np.arange(12) + 3
  np.testing.assert_array_equal(retrieval.ranks(*ours, relevant),
                                retrieval.ranks(*theirs, relevant))
  assert retrieval.score(*ours, relevant) == retrieval.score(*theirs, relevant)


def test_batching_does_not_change_results(tiny):
  model, params, tokenizer, _ = tiny
  texts = random_texts(11, seed=3, longest=40)
  alone = np.concatenate([decode.embed(model, params, [tokenizer.encode(t)]) for t in texts])
  for batch_size in (1, 4, 64):
    vectors = retrieval.encode(model, params, tokenizer, texts, batch_size=batch_size)
    assert vectors.shape == (11, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, alone, atol=1e-5)


def test_llmjax_tokenizers_are_wrapped_as_trained(tiny):
  model, params, _, _ = tiny
  tok = ByteTokenizer()  # ASCII ids (7 + byte) fit the tiny vocabulary
  texts = ["abc", "a longer text that is cut"]
  ids = [[tok.cls_id, *tok.encode(t).tolist(), tok.sep_id] for t in texts]
  want = decode.embed(model, params, [ids[0], ids[1][:9] + [tok.sep_id]])
  got = retrieval.encode(model, params, tok, texts, max_length=10)
  np.testing.assert_allclose(got, want, atol=1e-5)
