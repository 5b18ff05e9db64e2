"""Evaluation: perplexity, log-likelihood and multiple-choice scores, seq2seq metrics, BERT's
masked-token accuracy and pseudo-log-likelihood, retrieval; computed as the reference tools
(transformers, lm-evaluation-harness, sacrebleu, rouge-score) compute them."""

from llmjax.evaluation.scoring import loglikelihood, perplexity
from llmjax.evaluation.tasks import (bleu, encode_pair, exact_match, mlm_accuracy, multiple_choice,
                                     pseudo_log_likelihood, read_jsonl, rouge, seq2seq)
from llmjax.evaluation.tasks import run as run_task
