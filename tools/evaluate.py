"""Evaluates a training run or a converted checkpoint on tasks: a table, and a JSON of results.

    python tools/evaluate.py --workdir=RUN_DIR --task=perplexity:val.txt \\
        --task=multiple_choice:wikitext_next_sentence.jsonl --output=results.json
    python tools/evaluate.py --checkpoint=CONVERTED_DIR --task=seq2seq:pairs.jsonl:bleu \\
        --mesh=-1,1,1

A task is KIND:PATH[:METRIC] (llmjax/evaluation/tasks.py): perplexity of a text file,
multiple_choice or seq2seq (exact_match, bleu, rouge) JSONL, pll or mlm_accuracy of a BERT on
lines of text. The parameters are placed on a (data, fsdp, tensor) mesh of all devices by their
logical axes, and every batch is split over it. tools/build_eval_tasks.py makes example tasks.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from llmjax import paths  # noqa: E402

flags.DEFINE_string("workdir", None, "A training run's workdir: its latest checkpoint.")
flags.DEFINE_string("checkpoint", None, "A model checkpoint dir (tools/convert_hf.py writes one).")
flags.DEFINE_multi_string("task", [], "A task KIND:PATH[:METRIC] (repeatable).")
flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
flags.DEFINE_string("mesh", "-1,1,1", "The mesh's (data, fsdp, tensor) sizes; -1: the rest.")
flags.DEFINE_string("output", "eval_results.json", "Where the JSON of results goes.")
FLAGS = flags.FLAGS


def _fail(message):
  raise SystemExit("evaluate.py: " + " ".join(str(message).splitlines()))


def _placed(model, params, mesh_shape):
  """`params` placed on a mesh of all devices by their logical axes (replicated on one)."""
  import jax
  import jax.numpy as jnp
  from llmjax import sharding
  from llmjax.models import T5
  mesh = sharding.make_mesh(mesh_shape)
  args = (jnp.zeros((1, 4), jnp.int32),) * (2 if isinstance(model, T5) else 1)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  return jax.device_put(params, sharding.logical_sharding(abstract, mesh))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    _fail("give exactly one of --workdir=RUN_DIR or --checkpoint=CONVERTED_DIR")
  if not FLAGS.task:
    _fail("no tasks: give --task=KIND:PATH (repeatable)")
  try:
    mesh_shape = tuple(int(s) for s in FLAGS.mesh.split(","))
  except ValueError:
    _fail(f"--mesh={FLAGS.mesh}: expected three comma-separated ints such as -1,1,1")
  from llmjax.evaluation import tasks
  path = FLAGS.workdir or FLAGS.checkpoint
  try:
    for spec in FLAGS.task:
      tasks.parse(spec)
    paths.check_bucket(path)
  except ValueError as e:
    _fail(e)
  logging.set_verbosity(logging.WARNING)
  from tqdm import tqdm
  from llmjax import checkpoint
  results = {}
  try:
    model, params = checkpoint.load_model(path)
    params = _placed(model, params, mesh_shape)
    tokenizer = checkpoint.load_tokenizer(path)
    for spec in tqdm(FLAGS.task, desc="tasks", unit="task"):
      name, scores = tasks.run(spec, model, params, tokenizer, batch_size=FLAGS.batch_size)
      results[name] = {"task": spec, **scores}
  except (ValueError, OSError) as e:
    _fail(e)
  print(f"{'task':<24} {'metric':<16} {'value':>14}")
  for name, scores in results.items():
    for metric, value in scores.items():
      if metric != "task":
        print(f"{name:<24} {metric:<16} {value:>14.6g}")
  paths.path(FLAGS.output).write_text(json.dumps({"model": path, "results": results}, indent=2))
  print(f"results: {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
