"""Trains an experiment: `python -m llmjax.main --config=EXPERIMENT[:variant] --workdir=DIR`.

    python -m llmjax.main                                   # tiny GPT, built-in corpus, CPU
    python -m llmjax.main --config=experiments/gpt.py:tiny --workdir=/tmp/w \\
        --config.train.steps=500 --config.model.num_layers=2

With no --config it trains the default tiny byte-level GPT (llmjax/train/config.py) on the
built-in corpus (this Python's standard-library sources) for a few minutes, then prints a
sample of what it learned. A workdir that holds checkpoints is resumed from the latest.
Everything lands in the workdir: config.json, metrics.jsonl, TensorBoard events, checkpoints.

The log is our progress lines, warnings and errors; `--verbosity=0` adds the libraries' INFO
lines (Orbax's checkpointing, Grain's pipelines), `--verbosity=1` their debug lines.
"""

from __future__ import annotations

import os
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train", "config.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                          "Experiment file[:variant]; default: tiny GPT.",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes; default: a new temporary directory.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def sample(setup, params, prompt: str, num_tokens: int, seed: int = 0) -> str | None:
  """Text the trained decoder-only model writes after `prompt`; None for other families."""
  from llmjax import decode
  from llmjax.models.gpt import GPTConfig
  if not isinstance(setup.model.cfg, GPTConfig) or not num_tokens:
    return None
  return decode.sample_text(setup.model, params, setup.tokenizer, prompt, num_tokens, seed=seed)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # warnings and errors only: a save alone is ~40 INFO lines
    logging.set_verbosity(logging.WARNING)
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()  # Cloud TPU: every worker runs this same command
  from llmjax import train
  config = _CONFIG.value
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="llmjax-")
  try:
    result = train.train(config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, train.CheckpointError) as e:
    raise SystemExit(f"llmjax.main: {e}") from None
  final = [h for h in result.history if "eval/loss" in h]
  if final:
    print(f"\neval loss {final[0]['eval/loss']:.3f} -> {final[-1]['eval/loss']:.3f} "
          f"(step {final[0]['step']} -> {final[-1]['step']}); workdir {workdir}")
  run = result.setup.config  # as trained: `runlocal` shrinks it
  if jax.process_index() == 0 and run.train.sample_tokens:
    text = sample(result.setup, result.params, run.train.sample_prompt, run.train.sample_tokens)
    if text is not None:
      print(f"\nsample:\n{text}")


if __name__ == "__main__":
  app.run(main)
