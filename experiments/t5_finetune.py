"""T5 fine-tuned on a text-to-text task: {"inputs", "targets"} JSONL (the seq2seq objective).

    python tools/build_finetune_data.py --out_dir=/tmp/finetune_data
    python -m llmjax.main --config=experiments/t5.py:tiny --workdir=/tmp/t5_tiny
    python -m llmjax.main --config=experiments/t5_finetune.py:tiny --workdir=/tmp/t5_ft \
        --config.train.init_from=/tmp/t5_tiny

The example: the first line of a standard-library function's docstring from its code
(seq2seq_*.jsonl), starting from experiments/t5.py:tiny's span-corruption model
(`train.init_from`; without it, from scratch). Variants: tiny, tiny_lora (LoRA r=8 on q and v).
"""

from llmjax.train import base_config, model_config


def get_config(variant: str = "tiny"):
  if variant not in ("tiny", "tiny_lora"):
    raise ValueError(f"unknown variant {variant!r}; expected tiny or tiny_lora")
  c = base_config()
  c.model = model_config("t5", "tiny", vocab_size=384, dropout_rate=0.0)  # t5.py:tiny's
  c.objective.update(name="seq2seq", length=256, target_length=64)
  c.data.update(path="/tmp/finetune_data/seq2seq_train.jsonl",
                eval_path="/tmp/finetune_data/seq2seq_eval.jsonl")
  c.optimizer.update(learning_rate=1e-3, final_learning_rate=1e-4, warmup_steps=20)
  c.train.update(steps=300, log_every=25, eval_every=100, eval_batches=8, sample_tokens=0)
  if variant == "tiny_lora":
    c.lora.rank = 8
  return c
