"""Pre-training objectives: each a data transform (document -> examples) plus its loss.

    CausalLM      GPT next-token prediction          causal_lm.py
    PrefixLM      bidirectional prefix, loss on suffix
    MaskedLM      BERT 15% / 80-10-10 masking         masked_lm.py
    SpanCorruption T5 span corruption                 span_corruption.py

The batch format they share is documented in base.py.
"""

from llmjax.objectives.base import Objective, cross_entropy
from llmjax.objectives.causal_lm import CausalLM, PrefixLM
from llmjax.objectives.masked_lm import MaskedLM, mask_tokens
from llmjax.objectives.span_corruption import (SpanCorruption, noise_mask, span_corrupt,
                                               span_corruption_lengths)

OBJECTIVES = {"causal_lm": CausalLM, "prefix_lm": PrefixLM, "masked_lm": MaskedLM,
              "span_corruption": SpanCorruption}
