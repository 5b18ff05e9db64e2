"""Objectives: each a data transform (document -> examples) plus its loss.

    CausalLM      GPT next-token prediction          causal_lm.py
    PrefixLM      bidirectional prefix, loss on suffix
    MaskedLM      BERT 15% / 80-10-10 masking         masked_lm.py
    SpanCorruption T5 span corruption                 span_corruption.py
    Classification BERT/GPT/T5 (pair) classification  finetune.py (fine-tuning: JSON records)
    SFT           supervised (chat) fine-tuning
    Seq2Seq       T5 inputs -> targets

The batch format they share is documented in base.py. An experiment's `objective` config
section is {name, length, one field per setting of every objective}: `settings()` lists
them, `from_config` builds the named objective from it. Keyword-only arguments a class names
in `not_settings` (the model's `architecture`) are not settings: `from_config` passes them.
"""

import inspect

from llmjax.objectives.base import Objective, cross_entropy
from llmjax.objectives.causal_lm import CausalLM, PrefixLM
from llmjax.objectives.finetune import (SFT, Classification, Seq2Seq, parse_chat, render_chat,
                                        truncate_pair)
from llmjax.objectives.masked_lm import MaskedLM, mask_tokens
from llmjax.objectives.span_corruption import (SpanCorruption, noise_mask, span_corrupt,
                                               span_corruption_lengths)

OBJECTIVES = {"causal_lm": CausalLM, "prefix_lm": PrefixLM, "masked_lm": MaskedLM,
              "span_corruption": SpanCorruption, "classification": Classification, "sft": SFT,
              "seq2seq": Seq2Seq}


def _settings(cls) -> dict[str, inspect.Parameter]:
  """The keyword-only arguments of `cls.__init__` and of the base classes it passes them to."""
  out, skip = {}, set(getattr(cls, "not_settings", ()))
  for klass in cls.__mro__:
    if "__init__" in vars(klass):
      params = inspect.signature(vars(klass)["__init__"]).parameters.values()
      out.update({p.name: p for p in params
                  if p.kind is p.KEYWORD_ONLY and p.name not in out and p.name not in skip})
  return out


def settings() -> dict[str, tuple[object, str]]:
  """name -> (default, annotation) of every objective's settings (one name, one meaning)."""
  out = {}
  for cls in OBJECTIVES.values():
    for name, p in _settings(cls).items():
      if name in out and out[name][0] != p.default:
        raise AssertionError(f"objective setting {name!r} has two defaults")
      out[name] = (p.default, str(p.annotation))
  return out


def from_config(section, tokenizer, architecture: str | None = None) -> Objective:
  """The objective `section.name` of length `section.length` with its settings from `section`;
  `architecture` (the model class's ARCHITECTURE) goes to the objectives that take it."""
  if section.name not in OBJECTIVES:
    raise ValueError(f"objective.name={section.name!r}; expected one of {sorted(OBJECTIVES)}")
  cls = OBJECTIVES[section.name]
  try:
    extra = ({"architecture": architecture}
             if "architecture" in getattr(cls, "not_settings", ()) else {})
    return cls(tokenizer, section.length, **{k: section[k] for k in _settings(cls)}, **extra)
  except ValueError as e:  # name the config section the bad setting came from
    raise ValueError(f"objective (name={section.name!r}, length={section.length}): {e}") from None
