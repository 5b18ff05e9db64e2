"""nanoGPT's CPU "baby GPT" on tinyshakespeare, characters as tokens: the published baseline.

    python -m llmjax.main --config=experiments/shakespeare_char.py --workdir=W \
        --config.data.path=../shared/data/tinyshakespeare.txt

nanoGPT's config/train_shakespeare_char.py at its CPU settings: a 65-character vocabulary,
the first 90% of the text for training and the last 10% for validation, 4 layers, 4 heads,
d 128, block 64, batch 12, no biases, AdamW (beta2 0.99, weight decay 0.1, clipping at 1) at
1e-3 with 100 warmup steps and cosine decay to 1e-4 at 2000 steps, no dropout.

nanoGPT samples 64-character crops at random offsets; here each epoch cuts the training text
into 64-character windows from a random offset and shuffles all of them (one shuffle window
holds the epoch), so crops are new each epoch and no character is skipped. eval/loss is the
exact loss of the whole validation text in consecutive windows. nanoGPT prints 1.88 for this
run, from a 20-batch estimate; its exact validation loss, measured with the same windows,
is about 1.90 (1.891-1.908 over three seeds), and this experiment reaches 1.90 too.
"""

from llmjax.train import base_config, model_config


def get_config(variant: str = "baseline"):
  if variant != "baseline":
    raise ValueError(f"unknown variant {variant!r}; expected baseline")
  c = base_config()
  c.model = model_config("gpt", "tiny", vocab_size=65, d_model=128, num_layers=4, num_heads=4,
                         max_seq_len=64, dropout_rate=0.0, use_bias=False)
  c.objective.update(name="causal_lm", length=64, add_bos=False, add_eos=False,
                     random_offset=True)
  c.data.update(path="data/tinyshakespeare.txt", split="file", split_method="tail",
                validation_fraction=0.1, packing="pack", shuffle_window=16384)
  c.data.tokenizer = "char"  # the characters of data.path
  c.batch_size = 12
  c.optimizer.update(name="adamw", learning_rate=1e-3, final_learning_rate=1e-4,
                     warmup_steps=100, schedule="cosine", b1=0.9, b2=0.99, weight_decay=0.1,
                     clip_norm=1.0)
  c.train.update(steps=2000, log_every=100, eval_every=250, eval_batches=200,
                 checkpoint_every=1000, sample_prompt="ROMEO:", sample_tokens=300)
  return c
