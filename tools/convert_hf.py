"""Converts a local Hugging Face checkpoint into an llmjax model checkpoint (Orbax).

    python tools/convert_hf.py --hf_dir=path/to/hf_checkpoint --out_dir=path/to/llmjax_ckpt

The output holds model.json (the llmjax config) and params/ (Orbax); read it back with
`llmjax.checkpoint.load_model(out_dir)`. Config overrides such as --param_dtype=bfloat16
or --scan_layers are applied before writing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax import checkpoint, hf  # noqa: E402

flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors).")
flags.DEFINE_string("out_dir", None, "Where to write the llmjax checkpoint.")
flags.DEFINE_string("param_dtype", "float32", "Storage dtype of the written parameters.")
flags.DEFINE_bool("scan_layers", False, "Write layers stacked for nn.scan.")
flags.mark_flags_as_required(["hf_dir", "out_dir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if os.path.exists(os.path.join(FLAGS.out_dir, "params")):
    raise app.UsageError(f"--out_dir={FLAGS.out_dir!r} already holds a checkpoint")
  model, params = hf.load(FLAGS.hf_dir, param_dtype=FLAGS.param_dtype,
                          scan_layers=FLAGS.scan_layers)
  checkpoint.save_model(FLAGS.out_dir, model, params)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"wrote {type(model).__name__} ({n:,} parameters) to {os.path.abspath(FLAGS.out_dir)}")


if __name__ == "__main__":
  app.run(main)
