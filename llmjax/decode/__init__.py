"""Inference: compiled batched generation for GPT and T5 (greedy, sampling, beam search), BERT
fill-mask, and sentence embeddings."""

from llmjax.decode.encoders import BERT_MASK_ID, embed, fill_mask
from llmjax.decode.generation import TRACES, bucket, generate
from llmjax.decode.sampling import Sampler, top_p_filter
from llmjax.decode.text import sample_text
