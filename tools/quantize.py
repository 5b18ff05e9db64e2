"""Quantizes a training run's latest checkpoint or a converted model into a model checkpoint of
quantized values and scales (`llmjax.quant`), and prints what it saved and cost.

    python tools/quantize.py --workdir=RUN_DIR --out_dir=OUT --qtype=int8
    python tools/quantize.py --checkpoint=CONVERTED_DIR --out_dir=OUT --qtype=int4 \\
        --targets='.*' --tile_size=64 --sample="Some text to compare the logits on."

--qtype: int8 (weights, per channel), int4 (weights, per tile), w8a8 (int8 weights and
activations). --targets: a regex over weight paths ("layers_0/attn/query", "layers_3/mlp/wi",
"wte/embedding", ...); by default the attention projections and MLPs; '.*' takes every weight,
embeddings and head included. Prints the parameter bytes before and after (values at their
bits, scales included) and the logits' error on the sample (or on random tokens without a
tokenizer). A LoRA run's adapters are merged into its weights first. The output loads with
`llmjax.checkpoint.load_model` (and so tools/generate.py, tools/evaluate.py), and its
tokenizer_spec file names the source's tokenizer for `checkpoint.load_tokenizer` (which
reads it from there: keep the source's tokenizer files). Paths may be gs:// URLs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "A training run's workdir: its latest checkpoint.")
flags.DEFINE_string("checkpoint", None, "A model checkpoint dir (tools/convert_hf.py writes one).")
flags.DEFINE_string("out_dir", None, "Where to write the quantized model checkpoint (new).")
flags.DEFINE_string("qtype", "int8", "int8, int4 or w8a8.")
flags.DEFINE_string("targets", None, "Regex over weight paths; default: attention and MLPs.")
flags.DEFINE_integer("tile_size", None, "int4: the tile along the contracted dimension.")
flags.DEFINE_string("sample", "The quick brown fox jumps over the lazy dog. " * 4,
                    "Text whose logits are compared, float against quantized.")
FLAGS = flags.FLAGS


def _fail(message):
  raise SystemExit("quantize.py: " + " ".join(str(message).splitlines()))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # not Orbax's INFO lines about reading a checkpoint
  import jax.numpy as jnp
  import numpy as np

  from llmjax import checkpoint, models, paths, peft, quant
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    _fail("give exactly one of --workdir and --checkpoint")
  if not FLAGS.out_dir:
    _fail("give --out_dir, where the quantized checkpoint goes")
  source = FLAGS.workdir or FLAGS.checkpoint
  try:
    if FLAGS.qtype == "nf4":
      raise ValueError("qtype nf4 is for QLoRA's frozen base (LoraConfig.quantize); expected "
                       "int8, int4 or w8a8")
    quant.QuantConfig(FLAGS.qtype, FLAGS.targets, FLAGS.tile_size)  # bad flags before any work
    paths.check_bucket(source)
    paths.check_bucket(FLAGS.out_dir)
    out = paths.path(FLAGS.out_dir)
    if (out / "params").exists():
      raise ValueError(f"--out_dir={FLAGS.out_dir} already holds a checkpoint")
    model, params = checkpoint.load_model(source)
    if getattr(model, "quant", None):
      raise ValueError(f"{source} is already quantized ({model.quant.qtype}): quantize the float "
                       f"checkpoint")
    if getattr(model, "lora", None):  # a LoRA run: its adapters folded into the weights first
      model, params = peft.merge(model, params)
    qmodel, qparams = quant.quantize(model, params, FLAGS.qtype, targets=FLAGS.targets,
                                     tile_size=FLAGS.tile_size)
  except ValueError as e:
    _fail(e)
  try:
    tokenizer = checkpoint.load_tokenizer(source)
  except ValueError:
    tokenizer = None
  length = min(256, getattr(model.cfg, "max_seq_len", 256))
  if tokenizer is not None:
    ids = np.asarray(tokenizer.encode(FLAGS.sample), np.int32)[:length]
  else:
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, length).astype(np.int32)
  tokens = jnp.asarray(ids)[None]
  args = (tokens, tokens) if isinstance(model, models.T5) else (tokens,)
  ref = np.asarray(model.apply({"params": params}, *args), np.float32)
  got = np.asarray(qmodel.apply({"params": qparams}, *args), np.float32)
  checkpoint.save_model(FLAGS.out_dir, qmodel, qparams)
  if tokenizer is not None:
    (out / "tokenizer_spec").write_text(checkpoint.tokenizer_of(source))
  before, after = quant.nbytes(params), quant.nbytes(qparams)
  chosen = sorted(qmodel.provider.matched)
  print(f"quantized {len(chosen)} weights to {FLAGS.qtype} ({chosen[0]}, ...) -> {FLAGS.out_dir}")
  print(f"parameter bytes: {before:,} float -> {after:,} {FLAGS.qtype} ({after / before:.3f}x)")
  err = np.abs(got - ref)
  print(f"logits on {tokens.shape[1]} {'sample' if tokenizer else 'random'} tokens: max |error| "
        f"{err.max():.4g}, mean {err.mean():.4g} (logit scale {np.abs(ref).mean():.3g}); "
        f"same top-1 at {(got.argmax(-1) == ref.argmax(-1)).mean():.1%} of positions")


if __name__ == "__main__":
  app.run(main)
