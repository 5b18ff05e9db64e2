"""Fine-tuning example sets from the built-in corpus (this Python's standard-library sources).

    python tools/build_finetune_data.py --out_dir=/tmp/finetune_data

Writes, each as NAME_train.jsonl and NAME_eval.jsonl (a function or paragraph goes to eval
when a hash of its file and name puts it in the last tenth, so eval holds unseen code):

  sft       {"prompt": the def line and docstring, "response": the function's body}: write
            the function a docstring describes (experiments/sft.py).
  seq2seq   {"inputs": "summarize: " + the function without its docstring, "targets": the
            docstring's first line}: name what code does (experiments/t5_finetune.py).
  pairs     {"text": a paragraph, "text_pair": the next paragraph of its file (label 1) or
            one from another file (label 0), "label"}: next-paragraph prediction, the CPU-sized
            stand-in for ../shared/data/pairs/nsp_* (experiments/classify.py:tiny).

Functions over --max_chars characters are left out, as are paragraphs shorter than 40.
"""

import ast
import hashlib
import json
import os
import re
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from llmjax.data import sources  # noqa: E402

flags.DEFINE_string("out_dir", None, "Where to write the JSONL files (created if missing).")
flags.DEFINE_integer("max_chars", 1200, "The longest function (source characters) kept.")
flags.mark_flags_as_required(["out_dir"])
FLAGS = flags.FLAGS


def _hash(*parts: str) -> int:
  return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def functions(max_chars: int):
  """(file, name, signature + docstring, body, function without docstring, summary) for every
  documented function of the built-in corpus no longer than `max_chars`."""
  for path in sources.builtin_source().paths:
    text = open(path, encoding="utf-8").read()
    lines = text.splitlines(keepends=True)
    for node in ast.walk(ast.parse(text)):
      doc = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)
      if not doc or len(node.body) < 2:
        continue
      start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
      code = textwrap.dedent("".join(lines[start - 1:node.end_lineno]))
      head = textwrap.dedent("".join(lines[start - 1:node.body[0].end_lineno]))
      body = code[len(head):]
      if len(code) > max_chars or not body.strip() or not code.startswith(head):
        continue
      signature = textwrap.dedent("".join(lines[start - 1:node.body[0].lineno - 1]))
      yield (os.path.basename(path), node.name, head, body, signature + body,
             doc.strip().splitlines()[0])


def pairs():
  """Next-paragraph pairs (file, key, record) of the built-in corpus, one negative per positive:
  paragraphs are the blank-line-separated blocks of each file."""
  by_file = {os.path.basename(path): [p.strip() for p in re.split(r"\n\s*\n", open(
      path, encoding="utf-8").read()) if len(p.strip()) >= 40]
             for path in sources.builtin_source().paths}
  flat = [(f, t) for f, texts in by_file.items() for t in texts]
  for f, texts in by_file.items():
    others = [t for g, t in flat if g != f]
    for a, b in zip(texts, texts[1:]):
      yield f, a, {"text": a, "text_pair": b, "label": 1}
      yield f, a + "\x01", {"text": a, "text_pair": others[_hash(a) % len(others)], "label": 0}


def build(out_dir: str, max_chars: int = 1200) -> dict[str, tuple[int, int]]:
  """Writes every set into `out_dir`; returns {name: (train rows, eval rows)}."""
  os.makedirs(out_dir, exist_ok=True)
  sets = {"sft": [], "seq2seq": [], "pairs": []}
  for file, name, head, body, bare, summary in functions(max_chars):
    sets["sft"].append((file, name, {"prompt": head, "response": body}))
    sets["seq2seq"].append((file, name, {"inputs": "summarize: " + bare, "targets": summary}))
  sets["pairs"] = list(pairs())
  counts = {}
  for kind, rows in sets.items():
    split = {"train": [], "eval": []}
    for file, key, record in rows:
      split["eval" if _hash(str(file), key) % 10 == 9 else "train"].append(record)
    for part, records in split.items():
      with open(os.path.join(out_dir, f"{kind}_{part}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    counts[kind] = (len(split["train"]), len(split["eval"]))
  return counts


def main(argv):
  del argv
  for kind, (train, evals) in build(FLAGS.out_dir, FLAGS.max_chars).items():
    print(f"{FLAGS.out_dir}/{kind}_{{train,eval}}.jsonl: {train:,} + {evals:,} rows")


if __name__ == "__main__":
  app.run(main)
