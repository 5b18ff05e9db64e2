"""shakespeare_char as fast as it goes: nanoGPT's exact validation loss in the least time.

    python -m llmjax.main --config=experiments/shakespeare_speedrun.py --workdir=W \
        --config.data.path=../shared/data/tinyshakespeare.txt

The model and data of experiments/shakespeare_char.py (4 layers, 4 heads, d 128, block 64,
characters of tinyshakespeare, the last 10% for validation); the recipe is free: float32
(XLA:CPU's bfloat16 step of this model is slower: 69 ms against 50 at batch 16), batch 16,
AdamW at 6e-3 with 30 warmup steps and cosine decay to 1e-4 at 900 steps (1.1M tokens, 0.75
of the baseline's), one eval at the end (none at step 0), no sample. Its last eval/loss is the
exact loss of the whole validation text; `python tools/bench_train.py` times it beside the
baseline and nanoGPT's PyTorch.
"""

import importlib.util
import os


def get_config(variant: str = "speedrun"):
  if variant != "speedrun":
    raise ValueError(f"unknown variant {variant!r}; expected speedrun")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_char.py")
  spec = importlib.util.spec_from_file_location("shakespeare_char", path)
  baseline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(baseline)
  c = baseline.get_config("baseline")  # the same model and data
  c.batch_size = 16
  c.optimizer.update(learning_rate=6e-3, warmup_steps=30)
  c.train.update(steps=900, eval_every=900, eval_on_start=False, checkpoint_every=900,
                 sample_tokens=0)
  return c
