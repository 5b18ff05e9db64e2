"""Quantization's memory, quality and decode speed: float32, bfloat16, int8, int4 and w8a8 side
by side, for a model trained here and for GPT-2 small's shape.

    python tools/bench_quant.py --workdir=RUN_DIR      # a run of experiments/shakespeare_char.py
    python tools/bench_quant.py --nogpt2 --checkpoint=MODEL_DIR --text=held_out.txt

For each precision: parameter bytes (quantized values at their bits, scales included) of the
quantized weights with the default targets (attention and MLPs), and of the whole tree with
every weight quantized ('.*', embeddings and head too), each over float32's;
the held-out perplexity (`evaluation.perplexity`, windows of the model's context, on the last
--held_out fraction of the run's text, which the shakespeare run never trains on), the share
of positions of a --sample_tokens greedy sample of --prompt (`decode.sample_text`, in rounds
past the model's positions) equal to float32's, and decode tokens/s (`decode.generate`,
--batch rows of --new_tokens, best of --repeats after a compiling call). GPT-2 small has random
weights here (there is no hub): bytes and speed only.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from llmjax import checkpoint, decode, evaluation, models, quant  # noqa: E402

flags.DEFINE_string("workdir", None, "A trained GPT run (its latest checkpoint and its text).")
flags.DEFINE_string("checkpoint", None, "Or a GPT model checkpoint (with --text).")
flags.DEFINE_string("text", None, "The text held out from; default: the workdir's data.path.")
flags.DEFINE_float("held_out", 0.1, "The text's last fraction scored for perplexity.")
flags.DEFINE_bool("gpt2", True, "Also GPT-2 small's shape (random weights).")
flags.DEFINE_list("precisions", ["float32", "bfloat16", "int8", "int4", "w8a8"], "Rows.")
flags.DEFINE_integer("batch", 8, "Decode rows.")
flags.DEFINE_integer("new_tokens", 64, "Decode tokens per row.")
flags.DEFINE_integer("sample_tokens", 200, "Greedy sample compared with float32's.")
flags.DEFINE_string("prompt", "ROMEO:", "The greedy sample's prompt (decode.sample_text).")
flags.DEFINE_integer("repeats", 2, "Timed decode calls (the best is reported).")
FLAGS = flags.FLAGS


def variant(model, params, precision: str):
  """(model, params) at `precision`: float32 as given, bfloat16 cast, else quantized."""
  if precision == "float32":
    return model, params
  if precision == "bfloat16":
    cfg = model.cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    return type(model)(cfg), jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  return quant.quantize(model, params, precision)


def decode_rate(model, params) -> tuple[float, int]:
  """(generated tokens per second of a greedy batch, best of --repeats after a warm-up; tokens
  per row): --new_tokens, or half the positions of a model with fewer, after a prompt."""
  new = min(FLAGS.new_tokens, model.cfg.max_seq_len // 2)
  prompts = np.random.default_rng(0).integers(1, model.cfg.vocab_size,
                                              (FLAGS.batch, min(32, model.cfg.max_seq_len - new)))
  best = float("inf")
  for i in range(FLAGS.repeats + 1):
    start = time.perf_counter()
    np.asarray(decode.generate(model, params, prompts, new))
    if i:
      best = min(best, time.perf_counter() - start)
  return FLAGS.batch * new / best, new


def layer_ratio(params, qparams) -> float:
  """The quantized weights' bytes over their float32 bytes (1.0 if none is quantized)."""
  flat, qflat = (traverse_util.flatten_dict(p, sep="/") for p in (params, qparams))
  chosen = [k for k, v in qflat.items() if isinstance(v, quant.WithAux)]
  if not chosen:
    return quant.nbytes(qparams) / quant.nbytes(params)
  return quant.nbytes({k: qflat[k] for k in chosen}) / quant.nbytes({k: flat[k] for k in chosen})


def table(name, model, params, ids=None, tokenizer=None, prompt=""):
  """Prints one model's rows."""
  print(f"\n{name}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M parameters")
  print(f"{'precision':>10} | {'attn+mlp weights':>16} | {'all weights':>11} | "
        f"{'perplexity':>18} | {'greedy = f32':>14} | {'decode tok/s':>12}")
  base_ppl, base_sample, new = None, None, 0
  context = min(model.cfg.max_seq_len, 256)
  for precision in FLAGS.precisions:
    qmodel, qparams = variant(model, params, precision)
    every = quant.abstract(quant.wrap(model, quant.QuantConfig(precision, ".*"))) if (
        quant.is_quantized(qparams)) else qparams  # shapes suffice: bytes of every weight
    ppl = sample = "-"
    if ids is not None:
      value = evaluation.perplexity(qmodel, qparams, ids, context_length=context)["perplexity"]
      base_ppl = base_ppl or value
      ppl = f"{value:.4f}" + ("" if value == base_ppl else f" ({value / base_ppl - 1:+.2%})")
      text = decode.sample_text(qmodel, qparams, tokenizer, prompt, FLAGS.sample_tokens,
                                temperature=0.0)
      tokens = np.asarray(tokenizer.encode(text[len(prompt):]))
      base_sample = tokens if base_sample is None else base_sample
      n = min(len(tokens), len(base_sample))
      sample = f"{(tokens[:n] == base_sample[:n]).mean():.1%} of {n}"
    rate, new = decode_rate(qmodel, qparams)
    print(f"{precision:>10} | {layer_ratio(params, qparams):>15.3f}x | "
          f"{quant.nbytes(every) / quant.nbytes(params):>10.3f}x | {ppl:>18} | {sample:>14} | "
          f"{rate:>12.0f}")
  print(f"(bytes: of float32's, values at their bits, scales included; all weights: the whole "
        f"tree with every weight quantized; decode: {FLAGS.batch} rows x {new} new tokens)")


def main(argv):
  del argv
  source = FLAGS.workdir or FLAGS.checkpoint
  if source:
    model, params = checkpoint.load_model(source)
    if not isinstance(model, models.GPT):
      raise SystemExit(f"bench_quant.py: {source} holds a {type(model).__name__}; expected a GPT")
    text_path = FLAGS.text or (FLAGS.workdir and checkpoint.load_config(FLAGS.workdir).data.path)
    if not text_path:
      raise SystemExit("bench_quant.py: give --text, the text to hold out from")
    tokenizer = checkpoint.load_tokenizer(source)
    with open(text_path, encoding="utf-8") as f:
      text = f.read()
    ids = np.asarray(tokenizer.encode(text[int(len(text) * (1 - FLAGS.held_out)):]), np.int32)
    table(f"{source} ({len(ids):,} held-out tokens)", model, params, ids, tokenizer, FLAGS.prompt)
  if FLAGS.gpt2:
    model = models.GPT(models.GPTConfig(dropout_rate=0.0))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
    table("GPT-2 small shape, random weights", model, params)


if __name__ == "__main__":
  app.run(main)
