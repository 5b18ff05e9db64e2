"""The experiment config: one ml_collections ConfigDict, every field overridable from flags.

Experiments (`experiments/*.py`) start from `base_config()` and change what they need;
`--config.optimizer.learning_rate=3e-4` overrides a field, and a misspelled key is refused
with the nearest valid name. Every field of the model's dataclass is present, so any model
field can be overridden too.

    seed          everything random: parameters, data order, dropout
    model         family + every field of that family's config dataclass
    objective     name (causal_lm | prefix_lm | masked_lm | span_corruption), length, knobs
    data          source path ("builtin" or files), tokenizer ("byte", "char" = the characters
                  of data.path, a SentencePiece .model), split, packing, workers, shards
                  (default one per process; fixed, the batches don't depend on the hosts)
    batch_size    global batch (rows across all processes)
    optimizer     adamw | adafactor, schedule, clipping, decay, microbatches, z-loss, smoothing
    mesh          shape over (data, fsdp, tensor), -1 = the rest; rules override
    train         steps, intervals for logging / eval / checkpoints, init_from
    runlocal      True: shrink the experiment to a CPU smoke run (see `shrink_for_cpu`)
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from llmjax import models


def _field_type(annotation) -> type:
  """int / float / str / bool from a dataclass annotation such as "int | None"."""
  text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
  for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
    if name in text:
      return kind
  return object


def model_config(family: str, size: str, **overrides) -> ml_collections.ConfigDict:
  """A ConfigDict of every field of `family`'s config at `size`; None fields are typed placeholders."""
  if family not in models.FAMILIES:
    raise ValueError(f"unknown model family {family!r}; expected one of {sorted(models.FAMILIES)}")
  cfg_cls, _ = models.FAMILIES[family]
  cfg = cfg_cls.from_size(size, **overrides)
  out = ml_collections.ConfigDict({"family": family})
  for field in dataclasses.fields(cfg_cls):
    value = getattr(cfg, field.name)
    out[field.name] = config_dict.placeholder(_field_type(field.type)) if value is None else value
  return out


def objective_config(name: str = "causal_lm", length: int = 128) -> ml_collections.ConfigDict:
  """Which objective, its row length (the encoder length for span corruption) and its knobs."""
  return ml_collections.ConfigDict({
      "name": name, "length": length,
      "mask_rate": 0.15, "max_predictions": config_dict.placeholder(int), "whole_word": False,
      "noise_density": 0.15, "mean_noise_span_length": 3.0, "add_bos": True, "add_eos": True,
      "random_offset": False,
      "z_loss": 0.0, "label_smoothing": 0.0})


def base_config() -> ml_collections.ConfigDict:
  """The defaults every experiment starts from: a tiny byte-level GPT on the built-in corpus."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("gpt", "tiny", vocab_size=384, d_model=128, num_layers=4, num_heads=4,
                         max_seq_len=128, dropout_rate=0.0)
  c.objective = objective_config("causal_lm", 128)
  c.data = ml_collections.ConfigDict({
      "path": "builtin", "format": config_dict.placeholder(str), "split": "paragraph",
      "field": "text", "tokenizer": "byte", "validation_fraction": 0.05,
      "split_method": "hash", "packing": "pack", "shuffle_window": 0,
      "shards": config_dict.placeholder(int), "worker_count": 0, "prefetch": 2})
  c.batch_size = 8
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 2e-3, "schedule": "cosine", "warmup_steps": 50,
      "final_learning_rate": 2e-4, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.1,
      "clip_norm": 1.0, "microbatches": 1})
  c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1), "rules": config_dict.placeholder(str)})
  c.train = ml_collections.ConfigDict({
      "steps": 1000, "log_every": 50, "eval_every": 250, "eval_batches": 16,
      "checkpoint_every": 500, "keep_checkpoints": 3, "init_from": config_dict.placeholder(str),
      "sample_prompt": "def ", "sample_tokens": 200})
  c.runlocal = False
  return c


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The default experiment (what `python -m llmjax.main` runs with no --config)."""
  if variant:
    raise ValueError(f"the default config has no variants, got {variant!r}")
  return base_config()


def shrink_for_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` as a CPU smoke run (`--config.runlocal=True`): the same family, objective and
  optimizer, with the family's tiny model on the built-in corpus in byte tokens, a short
  context, a small batch and 20 steps on whatever devices there are."""
  c = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  length = min(c.objective.length, 128)
  kwargs = {"max_seq_len": length} if "max_seq_len" in c.model else {}
  c.model = model_config(c.model.family, "tiny", vocab_size=384,
                         dropout_rate=c.model.dropout_rate, **kwargs)
  c.objective.update(length=length, max_predictions=None)
  c.data.update(path="builtin", format=None, tokenizer="byte", split="paragraph",
                split_method="hash", validation_fraction=0.05, shards=None, worker_count=0)
  c.batch_size = 8
  c.optimizer.update(warmup_steps=min(c.optimizer.warmup_steps, 5), microbatches=1)
  c.mesh.shape = (-1, 1, 1)
  c.train.update(steps=min(c.train.steps, 20), log_every=5, eval_every=20, eval_batches=2,
                 checkpoint_every=20, init_from=None, sample_tokens=min(c.train.sample_tokens, 50))
  c.runlocal = False
  return c
