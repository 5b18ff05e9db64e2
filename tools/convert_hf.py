"""Converts a local Hugging Face checkpoint into an llmjax model checkpoint (Orbax).

    python tools/convert_hf.py --hf_dir=path/to/hf_checkpoint --out_dir=path/to/llmjax_ckpt

The output holds model.json (the llmjax config) and params/ (Orbax); read it back with
`llmjax.checkpoint.load_model(out_dir)`. Config overrides such as --param_dtype=bfloat16
or --scan_layers are applied before writing. The tokenizer files of --hf_dir (TOKENIZER_FILES)
are copied beside them, so `llmjax.data.load_tokenizer(out_dir)` reads the checkpoint's
tokenizer.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

from llmjax import checkpoint, hf  # noqa: E402

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
  """Copies the tokenizer files present in `hf_dir` into `out_dir` (a path or a gs:// URL, as
  Orbax takes); returns their names."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  for name in names:
    with open(os.path.join(hf_dir, name), "rb") as f:
      (epath.Path(out_dir) / name).write_bytes(f.read())
  return names


def main(argv):
  del argv
  if os.path.exists(os.path.join(FLAGS.out_dir, "params")):
    raise app.UsageError(f"--out_dir={FLAGS.out_dir!r} already holds a checkpoint")
  model, params = hf.load(FLAGS.hf_dir, param_dtype=FLAGS.param_dtype,
                          scan_layers=FLAGS.scan_layers)
  checkpoint.save_model(FLAGS.out_dir, model, params)
  copied = copy_tokenizer(FLAGS.hf_dir, FLAGS.out_dir)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"wrote {type(model).__name__} ({n:,} parameters) to {os.path.abspath(FLAGS.out_dir)}")
  print(f"copied {', '.join(copied)}" if copied else
        f"no tokenizer files in {FLAGS.hf_dir}: load_tokenizer({FLAGS.out_dir!r}) will fail")


if __name__ == "__main__":
  app.run(main)
