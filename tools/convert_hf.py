"""Converts a Hugging Face checkpoint into an llmjax model checkpoint (Orbax).

    python tools/convert_hf.py --hf_dir=path/to/hf_checkpoint --out_dir=path/to/llmjax_ckpt
    python tools/convert_hf.py --hf_dir=path/to/hf_checkpoint --out_dir=gs://BUCKET/ckpt

The output holds model.json (the llmjax config) and params/ (Orbax); read it back with
`llmjax.checkpoint.load_model(out_dir)`. Config overrides such as --param_dtype=bfloat16
or --scan_layers are applied before writing. The tokenizer files of --hf_dir (TOKENIZER_FILES)
are copied beside them, so `llmjax.data.load_tokenizer(out_dir)` reads the checkpoint's
tokenizer. Both directories may be gs:// URLs; --out_dir is proven writable (its bucket
reachable) before the checkpoint is read.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax import checkpoint, hf, paths  # noqa: E402

flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors).")
flags.DEFINE_string("out_dir", None, "Where to write the llmjax checkpoint.")
flags.DEFINE_string("param_dtype", "float32", "Storage dtype of the written parameters.")
flags.DEFINE_bool("scan_layers", False, "Write layers stacked for nn.scan.")
flags.mark_flags_as_required(["hf_dir", "out_dir"])
FLAGS = flags.FLAGS
# The fast tokenizer (what load_tokenizer reads), its special tokens, and the slow tokenizers'
# vocabularies, so transformers can load the converted directory too.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "vocab.txt", "vocab.json", "merges.txt")


def copy_tokenizer(hf_dir: str, out_dir: str) -> list[str]:
  """Copies the tokenizer files present in `hf_dir` into `out_dir` (each a path or a gs://
  URL); returns their names."""
  source, target = paths.path(hf_dir), paths.path(out_dir)
  names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
  for name in names:
    (target / name).write_bytes((source / name).read_bytes())
  return names


def convert(hf_dir: str, out_dir: str, **overrides):
  """Converts `hf_dir` into `out_dir`; returns (model, params, names of the tokenizer files
  copied). A ValueError of one line, before any work, for an unusable `out_dir` (an
  unreachable or unwritable bucket, or one that holds a checkpoint already)."""
  paths.check_buckets([hf_dir, out_dir])
  if (paths.path(out_dir) / "params").exists():
    raise ValueError(f"--out_dir={out_dir!r} already holds a checkpoint")
  paths.open_dir(out_dir, "--out_dir")
  model, params = hf.load(hf_dir, **overrides)
  checkpoint.save_model(out_dir, model, params)
  return model, params, copy_tokenizer(hf_dir, out_dir)


def main(argv):
  del argv
  try:
    model, params, copied = convert(FLAGS.hf_dir, FLAGS.out_dir, param_dtype=FLAGS.param_dtype,
                                    scan_layers=FLAGS.scan_layers)
  except (OSError, ValueError) as e:
    raise SystemExit(f"convert_hf: {e}") from None
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"wrote {type(model).__name__} ({n:,} parameters) to {paths.path(FLAGS.out_dir)}")
  print(f"copied {', '.join(copied)}" if copied else
        f"no tokenizer files in {FLAGS.hf_dir}: load_tokenizer({FLAGS.out_dir!r}) will fail")


if __name__ == "__main__":
  app.run(main)
