"""Restore time of a checkpoint with and without its checksums verified (llmjax.train.checkpoints).

    python tools/bench_checkpoint.py                   # GPT-2 small: params + Adam, 1.5 GB
    python tools/bench_checkpoint.py --size=tiny --repeats=1    # seconds

The train state is experiments/gpt.py's: the model of the --size variant (small: GPT-2
small, 124M parameters, vocab 50304) with its AdamW state, float32, as the run's init makes
it on this host's devices, Adam's moments filled with noise as training fills them (zeros
would compress to nothing); the data iterator is a small grain one. One checkpoint is saved
to --dir (a temporary directory by default; gs:// works too) and restored alternately with
and without verification; each figure is the best of --repeats restores, so the files are
in the page cache for both (as they are when a run restarts on the machine that saved them).
Also printed: the save's checksum pass (done on a background thread after Orbax's commit)
and verification alone, with its throughput and its share of an unverified restore: the
figure that restores' own spread (several percent on a busy 2-core machine) does not blur.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time

import grain
import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from llmjax import train
from llmjax.train import checkpoints, step

flags.DEFINE_string("size", "small", "experiments/gpt.py variant whose model is saved.")
flags.DEFINE_integer("repeats", 3, "Timed restores of each kind (best is reported).")
flags.DEFINE_string("dir", None, "Where to save (default: a new temporary directory).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state_of(size: str):
  """(abstract train state, the state) of experiments/gpt.py:`size`'s model, built from the
  tiny variant's data (the state does not depend on it)."""
  spec = importlib.util.spec_from_file_location("gpt", os.path.join(ROOT, "experiments", "gpt.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.model = module.get_config(size).model
  config.model.attention_impl = "xla"
  abstract, _, init = step.init_state(train.build(config), jax.random.key(0))
  state = init(jax.random.key(0))
  # Adam's moments start at zero, which compresses to nothing: fill them as training would.
  leaves, tree = jax.tree.flatten(state["opt_state"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state["opt_state"] = jax.tree.unflatten(tree, [
      jax.random.normal(k, x.shape, x.dtype) * 1e-3 if x.ndim else x
      for k, x in zip(keys, leaves)])
  return abstract, jax.block_until_ready(state)


def timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines, dozens a restore
  directory = FLAGS.dir or tempfile.mkdtemp(prefix="llmjax-bench-checkpoint-")
  abstract, state = state_of(FLAGS.size)
  arrays = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpts = checkpoints.Checkpoints(directory, every=1, keep=1)
  ckpts.save(1, state, it)
  ckpts._manager.wait_until_finished()
  ckpts._owed = None  # the checksum pass is timed here instead
  hashing = timed(lambda: ckpts._write_checksums(1))
  ckpts.close(1)
  del state
  nbytes = sum(entry[0] for entry in checkpoints._listing(epath.Path(directory) / "1").values())
  times = {True: [], False: []}
  for _ in range(FLAGS.repeats):
    for verify in (False, True):
      reader = checkpoints.Checkpoints(directory, every=1, keep=1, verify=verify)
      times[verify].append(timed(lambda: reader.restore(abstract, it)[0]))
  check = min(timed(lambda: reader._check(1)) for _ in range(FLAGS.repeats))
  plain, verified = min(times[False]), min(times[True])
  print(f"{FLAGS.size}: a {arrays / 1e9:.2f} GB train state ({len(jax.tree.leaves(abstract))} "
        f"arrays), {nbytes / 1e9:.2f} GB on disk in {directory}")
  print(f"  checksums at save   {hashing:6.3f} s  ({nbytes / hashing / 1e9:.1f} GB/s, background)")
  print(f"  restore unverified  {plain:6.3f} s  (median {np.median(times[False]):.3f} s)")
  print(f"  restore verified    {verified:6.3f} s  (median {np.median(times[True]):.3f} s): "
        f"{100 * (verified / plain - 1):+.1f}%")
  print(f"  verification alone  {check:6.3f} s  ({nbytes / check / 1e9:.1f} GB/s): "
        f"{100 * check / plain:.1f}% of an unverified restore")
  if not FLAGS.dir:
    shutil.rmtree(directory)


if __name__ == "__main__":
  app.run(main)
