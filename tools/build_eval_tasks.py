"""Builds example evaluation tasks from the reference corpora into a directory (not committed).

    python tools/build_eval_tasks.py --data_dir=../shared/data --out_dir=/tmp/eval_tasks

--data_dir holds tinyshakespeare.txt and wikitext2_valid.txt (shared/data/README.md). Writes:

  shakespeare_val.txt           the validation text of experiments/shakespeare_char.py: its
                                config's split (data.split, split_method "tail",
                                validation_fraction 0.1) made by `data.split_source` itself,
                                so it is exactly what the experiment's eval/loss reads.
  wikitext_next_sentence.jsonl  {"context": str, "choices": [str] * 4, "label": int}: which
                                sentence comes next. A paragraph's first 1-3 sentences, the
                                true next sentence and 3 distractor sentences from other
                                articles, in an order shuffled by --seed.
  wikitext_retrieval.jsonl      {"query": str, "passage": str}: a sentence and its successor
                                in the same paragraph, paragraphs cut into disjoint pairs
                                (sentences 1-2, 3-4, ...) and those whose query's text is a
                                passage dropped, so no query finds itself among the passages.
                                tools/rag.py --eval_pairs reads it.

WikiText-2 (--wikitext, the validation split by default) is cut as shared/data/pairs does it:
an article starts at a " = Title = " line, a paragraph is a line of text, sentences are split
at " . " and kept with 5 or more words, and the raw tokenization (" @-@ ", " , ") is undone.
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("data_dir", None, "Directory of tinyshakespeare.txt and the WikiText-2 file.")
flags.DEFINE_string("out_dir", None, "Where to write the task files (created if missing).")
flags.DEFINE_string("wikitext", "wikitext2_valid.txt", "The WikiText-2 file in --data_dir.")
flags.DEFINE_integer("seed", 0, "Seed of the next-sentence task's cuts, distractors and order.")
flags.mark_flags_as_required(["data_dir", "out_dir"])
FLAGS = flags.FLAGS


def detokenize(s: str) -> str:
  """WikiText's raw tokenization undone: "1 @,@ 000 km ( 5 mi )" -> "1,000 km (5 mi)"."""
  s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
  s = re.sub(r" ([.,;:!?%)\]'])", r"\1", s)
  s = re.sub(r"([(\[$]) ", r"\1", s)
  s = s.replace(" n't", "n't").replace(" 's", "'s")
  return re.sub(r'" (.*?) "', r'"\1"', s).strip()


def articles(text: str) -> list[list[list[str]]]:
  """WikiText's articles, each a list of paragraphs, each a list of sentences."""
  arts = []
  for line in text.splitlines():
    line = line.strip()
    if re.fullmatch(r"= [^=].* =", line):
      arts.append([])
    elif line and not line.startswith("=") and arts:
      sentences = [detokenize(s) for s in line.split(" . ") if len(s.split()) >= 5]
      arts[-1].append([s if s.endswith(".") else s + "." for s in sentences])
  return [a for a in arts if a]


def next_sentence(arts, seed: int) -> list[dict]:
  """One multiple-choice item per paragraph of 2+ sentences (see the module docstring)."""
  rng = np.random.default_rng(seed)
  pool = [(i, s) for i, art in enumerate(arts) for para in art for s in para if len(s) <= 300]
  items = []
  for i, art in enumerate(arts):
    for para in (p for p in art if len(p) >= 2):
      cut = int(rng.integers(1, min(len(para), 4)))
      choices = [para[cut]]
      for _ in range(10_000):  # a draw from this article or a repeat is drawn again
        j, s = pool[rng.integers(len(pool))]
        choices += [s] if j != i and s not in choices else []
        if len(choices) == 4:
          break
      else:
        raise ValueError("too few articles for distractors: expected a WikiText-2 split")
      order = rng.permutation(4)
      items.append({"context": " ".join(para[:cut]), "choices": [choices[k] for k in order],
                    "label": int(np.flatnonzero(order == 0)[0])})
  return items


def retrieval_pairs(arts) -> list[dict]:
  """{"query": a, "passage": b} for sentences 1-2, 3-4, ... of each paragraph."""
  pairs = [(a, b) for art in arts for para in art for a, b in zip(para[0::2], para[1::2])]
  passages = {b for _, b in pairs}
  return [{"query": a, "passage": b} for a, b in pairs if a not in passages]


def shakespeare_val(path: str) -> str:
  """The validation text of experiments/shakespeare_char.py, split as its config says."""
  from experiments import shakespeare_char
  from llmjax import data
  config = shakespeare_char.get_config()
  c = config.data
  source = data.sources.open_source(path, format=c.format, split=c.split, field=c.field)
  _, val = data.split_source(source, c.validation_fraction, method=c.split_method,
                             seed=config.seed)
  return "".join(val[i] for i in range(len(val)))


def write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"build_eval_tasks.py: unexpected arguments {argv[1:]}")
  sources = [os.path.join(FLAGS.data_dir, n) for n in ("tinyshakespeare.txt", FLAGS.wikitext)]
  for path in sources:
    if not os.path.isfile(path):
      raise SystemExit(f"build_eval_tasks.py: {path} does not exist; --data_dir must hold "
                       f"tinyshakespeare.txt and {FLAGS.wikitext}")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  val = shakespeare_val(sources[0])
  with open(os.path.join(FLAGS.out_dir, "shakespeare_val.txt"), "w", encoding="utf-8") as f:
    f.write(val)
  with open(sources[1], encoding="utf-8") as f:
    arts = articles(f.read())
  items, pairs = next_sentence(arts, FLAGS.seed), retrieval_pairs(arts)
  write_jsonl(os.path.join(FLAGS.out_dir, "wikitext_next_sentence.jsonl"), items)
  write_jsonl(os.path.join(FLAGS.out_dir, "wikitext_retrieval.jsonl"), pairs)
  print(f"wrote to {FLAGS.out_dir}: shakespeare_val.txt ({len(val):,} characters), "
        f"wikitext_next_sentence.jsonl ({len(items):,} items), "
        f"wikitext_retrieval.jsonl ({len(pairs):,} pairs)")


if __name__ == "__main__":
  app.run(main)
