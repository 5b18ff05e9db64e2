"""Supervised fine-tuning of a GPT: loss on the responses only (llmjax/objectives/finetune.py).

    python tools/build_finetune_data.py --out_dir=/tmp/finetune_data
    python -m llmjax.main --config=experiments/gpt.py:tiny --workdir=/tmp/gpt_tiny
    python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny \
        --config.train.init_from=/tmp/gpt_tiny

The example: write the body of a standard-library function from its def line and docstring
(sft_*.jsonl, {"prompt", "response"}), starting from the GPT that experiments/gpt.py:tiny
pre-trained on the same corpus (`train.init_from`; without it, from scratch). Records may be
chats instead, {"messages": [{"role", "content"}, ...]}, rendered by the documented template.
Variants: tiny (full fine-tuning), tiny_lora (LoRA r=8 on attention's q, k and v) and
tiny_qlora (the same over an nf4 base: init_from's projections quantized as they load).
"""

from llmjax.train import base_config


def get_config(variant: str = "tiny"):
  if variant not in ("tiny", "tiny_lora", "tiny_qlora"):
    raise ValueError(f"unknown variant {variant!r}; expected tiny, tiny_lora or tiny_qlora")
  c = base_config()  # its model is experiments/gpt.py:tiny's
  c.objective.update(name="sft", length=128)
  c.data.update(path="/tmp/finetune_data/sft_train.jsonl",
                eval_path="/tmp/finetune_data/sft_eval.jsonl")
  c.optimizer.update(learning_rate=3e-4, final_learning_rate=3e-5, warmup_steps=20,
                     weight_decay=0.0)
  c.train.update(steps=300, log_every=25, eval_every=100, eval_batches=8,
                 sample_prompt='def add(a, b):\n    """Add a to b."""\n',
                 sample_tokens=60)
  if variant in ("tiny_lora", "tiny_qlora"):
    c.lora.rank = 8
    c.optimizer.learning_rate = 2e-3
  if variant == "tiny_qlora":
    c.lora.quantize = "nf4"
  return c
