"""The three Transformer families: networks that map tokens to logits (or hidden states)."""

import dataclasses
from typing import Any

from flax import linen as nn

from llmjax.models.bert import Bert, BertConfig
from llmjax.models.common import check, stack_layers, unstack_layers
from llmjax.models.gpt import GPT, GPTConfig
from llmjax.models.t5 import T5, T5Config

FAMILIES = {"gpt": (GPTConfig, GPT), "bert": (BertConfig, Bert), "t5": (T5Config, T5)}


def config_to_dict(cfg) -> dict[str, Any]:
  """A JSON-able description of a model config: {"family": ..., field: value, ...}."""
  family = next((f for f, (c, _) in FAMILIES.items() if isinstance(cfg, c)), None)
  check(family is not None, f"not an llmjax model config: {type(cfg).__name__}")
  return {"family": family, **dataclasses.asdict(cfg)}


def model_from_dict(d: dict[str, Any]) -> nn.Module:
  """The model described by `config_to_dict`'s output."""
  d = dict(d)
  family = d.pop("family", None)
  check(family in FAMILIES, f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
  cfg_cls, model_cls = FAMILIES[family]
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cfg_cls)})
  check(not unknown, f"unknown {cfg_cls.__name__} fields {unknown}")
  return model_cls(cfg_cls(**d))
