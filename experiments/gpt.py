"""GPT with causal LM: the tiny default on the built-in corpus, or GPT-2 small.

    python -m llmjax.main --config=experiments/gpt.py:tiny --workdir=/tmp/gpt_tiny
    python -m llmjax.main --config=experiments/gpt.py:small --workdir=W --config.data.path='c4/*.jsonl'

Variants: tiny (d 128, 4 layers, byte tokens, a few minutes on a laptop CPU) and small
(GPT-2 small, 124M params, context 1024; needs an accelerator and a real corpus).
`--config.runlocal=True` shrinks any variant to a CPU smoke run.
"""

from llmjax.train import base_config, model_config


def get_config(variant: str = "tiny"):
  c = base_config()
  if variant == "small":
    c.model = model_config("gpt", "small", vocab_size=50304, max_seq_len=1024,
                           attention_impl="auto")
    c.objective.length = 1024
    c.data.tokenizer = "gpt2.model"
    c.batch_size = 512
    c.optimizer.update(learning_rate=6e-4, final_learning_rate=6e-5, warmup_steps=2000,
                       b2=0.95)
    c.train.update(steps=100_000, log_every=100, eval_every=1000, checkpoint_every=1000)
  elif variant != "tiny":
    raise ValueError(f"unknown variant {variant!r}; expected tiny or small")
  return c
