"""T5 with span corruption (15% noise, mean span 3): tiny on the built-in corpus, small or base.

    python -m llmjax.main --config=experiments/t5.py:tiny --workdir=/tmp/t5_tiny
    python -m llmjax.main --config=experiments/t5.py:base --workdir=W --config.data.path=...

Inputs of 512 tokens come from raw chunks of 568 with targets of 114, as in T5; the
published recipe is Adafactor with an rsqrt schedule (1e-2 peak, 10k warmup).
"""

from llmjax.train import base_config, model_config


def get_config(variant: str = "tiny"):
  c = base_config()
  c.objective.name = "span_corruption"
  c.train.sample_tokens = 0
  if variant == "tiny":
    c.model = model_config("t5", "tiny", vocab_size=384, dropout_rate=0.0)
    c.objective.length = 128
    c.optimizer.update(learning_rate=1e-3, final_learning_rate=1e-4)
  elif variant in ("small", "base"):
    c.model = model_config("t5", f"v1_1-{variant}", vocab_size=32128, attention_impl="auto")
    c.objective.length = 512
    c.data.tokenizer = "spm32k.model"
    c.batch_size = 128
    c.optimizer.update(name="adafactor", learning_rate=1e-2, schedule="rsqrt",
                       warmup_steps=10_000, weight_decay=0.0, clip_norm=0.0)
    c.train.update(steps=524_288, log_every=100, eval_every=5000, checkpoint_every=5000)
  else:
    raise ValueError(f"unknown variant {variant!r}; expected tiny, small, base")
  return c
