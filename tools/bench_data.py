"""Tokens per second of the whole input pipeline, per objective, beside what the CPU trainer eats.

    python tools/bench_data.py                         # built-in corpus, byte tokenizer
    python tools/bench_data.py --data='wiki/*.txt' --tokenizer=spm.model --seq_len=512

Each pre-training objective runs the full pipeline (read, tokenize, objective, pack, batch) on
one core of this machine; tokens/s counts the real (non-padding) input tokens delivered. The
trainer figure times AdamW steps of the main job's tiny GPT at the same batch shape, so the last
column says how many times faster the pipeline is than the model it feeds.
"""

import time

import numpy as np
from absl import app, flags

from llmjax import data, objectives
from llmjax.data.sources import SPLITS

flags.DEFINE_string("data", "builtin", "Files, globs, a shard directory or 'builtin'.")
flags.DEFINE_enum("split", "paragraph", SPLITS,
                  "Text files: a document per line, paragraph or file.")
flags.DEFINE_string("tokenizer", "byte", "'byte', 'byte:N' or a SentencePiece .model path.")
flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
flags.DEFINE_integer("seq_len", 128, "Row length (encoder length for span corruption).")
flags.DEFINE_float("seconds_each", 3.0, "Time to run each objective.")
flags.DEFINE_integer("train_steps", 30, "Train steps timed for the trainer's figure (0: skip).")
FLAGS = flags.FLAGS


def pipeline_rate(source, tokenizer, objective, seconds: float) -> tuple[float, float]:
  """(real tokens per second, mean fill) of the pipeline, after its first batch."""
  it = iter(data.make_pipeline(source, tokenizer, objective, batch_size=FLAGS.batch_size))
  next(it)
  tokens, fills, start = 0, [], time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    segment_ids = batch.get("segment_ids", batch.get("encoder_segment_ids"))
    tokens += int((segment_ids > 0).sum())
    fills.append(float((segment_ids > 0).mean()))
  rate = tokens / (time.perf_counter() - start)
  it.close()
  return rate, float(np.mean(fills))


def trainer_rate(steps: int) -> float:
  """Tokens per second of AdamW steps on the main job's tiny GPT (d 128, 4 layers) at this shape."""
  import jax
  import optax
  from llmjax.models.gpt import GPT, GPTConfig
  model = GPT(GPTConfig.from_size("tiny", vocab_size=384, d_model=128, num_layers=4, num_heads=4,
                                  max_seq_len=FLAGS.seq_len, dropout_rate=0.0))
  tokens_BT = np.zeros((FLAGS.batch_size, FLAGS.seq_len), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens_BT)["params"]
  tx = optax.adamw(1e-3)
  objective = objectives.CausalLM(data.ByteTokenizer(), FLAGS.seq_len)

  @jax.jit
  def step(params, opt_state, batch):
    loss_fn = lambda p: objective.loss(objective.logits(model, {"params": p}, batch), batch)[0]
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batch = {"tokens": tokens_BT, "targets": tokens_BT,
           "weights": np.ones(tokens_BT.shape, np.float32),
           "segment_ids": np.ones_like(tokens_BT), "positions": np.broadcast_to(
               np.arange(FLAGS.seq_len, dtype=np.int32), tokens_BT.shape)}
  opt_state = tx.init(params)
  params, opt_state = jax.block_until_ready(step(params, opt_state, batch))  # compile
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
  jax.block_until_ready(params)
  return steps * tokens_BT.size / (time.perf_counter() - start)


def main(argv):
  del argv
  source = data.sources.open_source(FLAGS.data, split=FLAGS.split)
  tokenizer = data.load_tokenizer(FLAGS.tokenizer)
  trainer = trainer_rate(FLAGS.train_steps) if FLAGS.train_steps else None
  print(f"{source}, {tokenizer}, batch {FLAGS.batch_size} x {FLAGS.seq_len}, packed")
  if trainer:
    print(f"trainer (tiny GPT, this CPU): {trainer:,.0f} tokens/s")
  print(f"{'objective':<16} {'tokens/s':>12} {'fill':>6}" + ("  x trainer" if trainer else ""))
  for name, make in objectives.OBJECTIVES.items():
    if hasattr(make, "check_record"):  # fine-tuning objectives read JSON records, not text
      continue
    rate, fill = pipeline_rate(source, tokenizer, make(tokenizer, FLAGS.seq_len),
                               FLAGS.seconds_each)
    print(f"{name:<16} {rate:12,.0f} {fill:6.1%}" + (f"  {rate / trainer:9.1f}" if trainer else ""))


if __name__ == "__main__":
  app.run(main)
