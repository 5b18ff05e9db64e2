"""Data: document sources, tokenizers and the Grain pipeline that turns them into batches."""

from llmjax.data.hf_tokenizer import HFTokenizer
from llmjax.data.pipeline import fill, is_padding, make_pipeline, padding_batch
from llmjax.data.sources import (ArrayRecordSource, JsonlSource, TextSource, builtin_source,
                                 expand_paths, split_source)
from llmjax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, check_vocab,
                                    load_tokenizer, train_sentencepiece)
