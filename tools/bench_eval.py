"""Scoring speed: evaluation.perplexity and evaluation.loglikelihood beside the trainer's eval step.

    python tools/bench_eval.py                      # GPT "small" shapes at 256 tokens, batch 8
    python tools/bench_eval.py --size=tiny --length=64 --batch=16 --batches=20

All three score the same random GPT on the same number of tokens, in rows of --length tokens
and --batch rows per forward pass: the trainer's eval step (train.step.make_eval_step on
CausalLM batches: the objective's summed cross-entropy), perplexity of a stream of
batches x batch x length tokens (rolling windows of --length), and loglikelihood of
requests of --length tokens (context + a continuation of a quarter of them). Tokens/s counts
the tokens the model reads; each is the best of --repeats timed runs after a warm-up run (the
compilation). The ratio column is the trainer's eval step's tokens/s over each one's.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from llmjax import data, evaluation, objectives, sharding
from llmjax.models.gpt import GPT, GPTConfig
from llmjax.train import step

flags.DEFINE_string("size", "small", "GPTConfig size (its vocabulary and widths).")
flags.DEFINE_integer("length", 256, "Tokens per row (the context length).")
flags.DEFINE_integer("batch", 8, "Rows per forward pass.")
flags.DEFINE_integer("batches", 8, "Forward passes per timed run.")
flags.DEFINE_integer("repeats", 3, "Timed runs (best is reported).")
FLAGS = flags.FLAGS


def best_seconds(run) -> float:
  run()  # compiles
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  B, L, N = FLAGS.batch, FLAGS.length, FLAGS.batches
  tok = data.ByteTokenizer()  # only the objective's check of the vocabulary reads it
  cfg = GPTConfig.from_size(FLAGS.size, max_seq_len=L, dropout_rate=0.0)
  cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.vocab_size))
  model = GPT(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  rng = np.random.default_rng(0)
  stream = rng.integers(0, cfg.vocab_size, N * B * L + 1).astype(np.int32)

  parts = step.Parts(model, objectives.CausalLM(tok, L, add_bos=False, add_eos=False),
                     optax.sgd(0.0), sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  rows = stream[:-1].reshape(N, B, L)
  batches = [{"tokens": rows[i], "targets": stream[1:].reshape(N, B, L)[i],
              "weights": np.ones((B, L), np.float32), "segment_ids": np.ones((B, L), np.int32),
              "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))}
             for i in range(N)]
  replicated = jax.sharding.NamedSharding(parts.mesh, jax.P())
  shardings = {k: replicated for k in batches[0]}
  eval_step = step.make_eval_step(parts, jax.tree.map(lambda _: replicated, params), shardings)

  def trainer():
    totals = [eval_step(params, b) for b in batches]
    jax.block_until_ready(totals)

  def perplexity():
    evaluation.perplexity(model, params, stream, context_length=L, batch_size=B)

  cont = L // 4
  requests = [(stream[i * L:i * L + L - cont], stream[i * L + L - cont:(i + 1) * L])
              for i in range(N * B)]

  def loglikelihood():
    evaluation.loglikelihood(model, params, requests, batch_size=B)

  tokens = N * B * L
  print(f"GPT {FLAGS.size}: {sum(x.size for x in jax.tree.leaves(params)):,} params, "
        f"{N} x [{B}, {L}] = {tokens:,} tokens, {jax.devices()[0].platform}")
  base = None
  for name, run in (("trainer eval step", trainer), ("evaluation.perplexity", perplexity),
                    ("evaluation.loglikelihood", loglikelihood)):
    rate = tokens / best_seconds(run)
    base = base or rate
    print(f"{name:<26} {rate:>12,.0f} tokens/s   trainer / this {base / rate:5.2f}x")


if __name__ == "__main__":
  app.run(main)
