"""The three Transformer families: networks that map tokens to logits (or hidden states)."""

from llmjax.models.bert import Bert, BertConfig
from llmjax.models.common import stack_layers, unstack_layers
from llmjax.models.gpt import GPT, GPTConfig
from llmjax.models.t5 import T5, T5Config
