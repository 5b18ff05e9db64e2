"""BERT with masked LM (15%, 80/10/10): tiny on the built-in corpus, or BERT-base.

    python -m llmjax.main --config=experiments/bert.py:tiny --workdir=/tmp/bert_tiny
    python -m llmjax.main --config=experiments/bert.py:base --workdir=W --config.data.path=...

`--config.runlocal=True` shrinks any variant to a CPU smoke run (see experiments/README.md).
"""

from llmjax.train import base_config, model_config


def get_config(variant: str = "tiny"):
  c = base_config()
  c.objective.name = "masked_lm"
  c.train.sample_tokens = 0
  if variant == "tiny":
    c.model = model_config("bert", "tiny", vocab_size=384, max_seq_len=128, dropout_rate=0.0)
    c.objective.length = 128
    c.optimizer.update(learning_rate=1e-3, final_learning_rate=1e-4)
  elif variant == "base":
    c.model = model_config("bert", "base", vocab_size=32000, max_seq_len=512,
                           attention_impl="auto")
    c.objective.update(length=512, max_predictions=80)
    c.data.tokenizer = "spm32k.model"
    c.batch_size = 256
    c.optimizer.update(learning_rate=1e-4, final_learning_rate=0.0, warmup_steps=10_000,
                       schedule="linear", b2=0.999, weight_decay=0.01)
    c.train.update(steps=1_000_000, log_every=100, eval_every=5000, checkpoint_every=5000)
  else:
    raise ValueError(f"unknown variant {variant!r}; expected tiny or base")
  return c
