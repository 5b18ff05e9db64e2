"""A decoder-only GPT trained as a prefix LM: bidirectional prefix, loss on the suffix.

    python -m llmjax.main --config=experiments/prefix_lm.py --workdir=/tmp/prefix_lm

Each window is split at a uniformly random point (T5's prefix LM, UL2's S-denoiser).
"""

from llmjax.train import base_config


def get_config(variant: str = "tiny"):
  if variant != "tiny":
    raise ValueError(f"unknown variant {variant!r}; expected tiny")
  c = base_config()
  c.objective.name = "prefix_lm"
  return c
