"""Task-level evaluations: multiple choice on lm-evaluation-harness's terms, BLEU and ROUGE as
sacrebleu and rouge-score compute them, BERT's pseudo-log-likelihood against transformers, and
the errors a bad task or request gives."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from llmjax import data, decode, evaluation, hf
from llmjax.models.gpt import GPT, GPTConfig

from tests import hf_reference

TOK = data.ByteTokenizer()


@pytest.fixture(scope="module")
def gpt():
  model = GPT(GPTConfig.from_size("tiny", vocab_size=TOK.vocab_size, max_seq_len=64))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_multiple_choice_is_the_argmax_of_loglikelihoods_raw_and_per_character(gpt, tmp_path):
  model, params = gpt
  records = [{"context": "The cat sat on the ", "choices": ["mat", "hat", "dog house"], "label": 0},
             {"context": "", "choices": ["yes", "no"], "label": 1},
             {"context": "One, two,", "choices": ["three", "four!", "x"], "label": 2}]
  got = evaluation.multiple_choice(model, params, TOK, _write(tmp_path / "mc.jsonl", records))
  acc = acc_norm = 0
  for r in records:  # by hand: the harness's whitespace rule and prefix token
    context = r["context"].rstrip()
    reqs = []
    for c in r["choices"]:
      cont = r["context"][len(context):] + " " + c
      ctx = list(TOK.encode(context)) if context else [TOK.bos_id]
      reqs.append((ctx, list(TOK.encode(cont))))
    lp = np.array([x for x, _ in evaluation.loglikelihood(model, params, reqs)])
    acc += np.argmax(lp) == r["label"]
    acc_norm += np.argmax(lp / [len(c) for c in r["choices"]]) == r["label"]
  assert got == {"acc": acc / 3, "acc_norm": acc_norm / 3, "count": 3}
  assert evaluation.encode_pair(TOK, "a  ", "b", False) == (list(TOK.encode("a")),
                                                           list(TOK.encode("  b")))


ACCENTED = ["O gato não está na mesa, disse João.", "Ação e coração: uma canção."]
PLAIN = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]


def test_bleu_and_rouge_are_the_libraries_own_values_with_t5_settings():
  preds = ["O gato não está na mesa disse João", "Ação e emoção: uma canção!"] + PLAIN
  refs = ACCENTED + ["the cat is on the mat", "the quick brown fox jumped over a lazy dog"]
  assert evaluation.bleu(preds, refs) == sacrebleu.corpus_bleu(
      preds, [refs], tokenize="intl", smooth_method="exp").score
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"],
                                    tokenizer=evaluation.tasks.UnicodeTokenizer())
  got = evaluation.rouge(preds, refs)
  for key in ("rouge1", "rouge2", "rougeLsum"):
    want = np.mean([scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)]) * 100
    assert got[key] == pytest.approx(want, abs=1e-9)
  # The default tokenizer keeps only [a-z0-9]: "são" becomes "s o", "só" "s", and they overlap.
  assert evaluation.rouge(["são"], ["só"])["rouge1"] == 0.0
  assert rouge_scorer.RougeScorer(["rouge1"]).score("só", "são")["rouge1"].fmeasure > 0
  assert evaluation.rouge(ACCENTED, ACCENTED)["rougeLsum"] == 100.0
  assert evaluation.exact_match([" a ", "b"], ["a", "c"]) == 50.0


def test_seq2seq_scores_the_greedy_generations(gpt, tmp_path):
  model, params = gpt
  inputs = ["abc", "hello wor", "xyz"]
  outs = np.asarray(decode.generate(model, params, [TOK.encode(t) for t in inputs], 5,
                                    eos_id=TOK.eos_id))
  targets = [TOK.decode(outs[0]), "not it", TOK.decode(outs[2])]
  path = _write(tmp_path / "s2s.jsonl", [{"input": i, "target": t}
                                          for i, t in zip(inputs, targets)])
  got = evaluation.seq2seq(model, params, TOK, path, metric="exact_match", max_new_tokens=5)
  assert got == {"exact_match": pytest.approx(200 / 3), "count": 3}
  name, scores = evaluation.run_task(f"seq2seq:{path}:bleu", model, params, TOK)
  assert name == "s2s" and set(scores) == {"bleu", "count"}


def test_bert_pseudo_log_likelihood_equals_transformers(tmp_path):
  torch_model = hf_reference.make_bert_mlm(str(tmp_path)).model.eval()
  model, params = hf.load(str(tmp_path))
  sentences = [[101, 7, 55, 200, 9, 102], [101, 42, 102], [101, 3, 3, 3, 30, 60, 90, 120, 102]]
  got = evaluation.pseudo_log_likelihood(model, params, sentences, batch_size=4)
  for s, pll in zip(sentences, got):
    want = 0.0
    for i in range(1, len(s) - 1):
      masked = list(s)
      masked[i] = 103
      with torch.no_grad():
        logits = torch_model(torch.tensor([masked])).logits[0, i].double()
      want += float(torch.log_softmax(logits, -1)[s[i]])
    np.testing.assert_allclose(pll, want, rtol=1e-4)
  acc = evaluation.mlm_accuracy(model, params, sentences, rate=0.5)
  assert acc["tokens"] == 2 + 1 + 4 and 0.0 <= acc["accuracy"] <= 1.0


def test_bad_input_names_what_is_wrong(gpt, tmp_path):
  model, params = gpt
  bert_model, bert_params = None, None
  with pytest.raises(ValueError, match="request 1 has an empty continuation"):
    evaluation.loglikelihood(model, params, [([1], [2]), ([1, 2], [])])
  with pytest.raises(ValueError, match="stride=40; expected 1 <= stride <= context_length=32"):
    evaluation.perplexity(model, params, np.arange(100), context_length=32, stride=40)
  with pytest.raises(ValueError, match="context_length=65; expected 1 to the model's 64"):
    evaluation.perplexity(model, params, np.arange(100), context_length=65)
  from llmjax.models.bert import Bert, BertConfig
  bert = Bert(BertConfig.from_size("tiny"))
  with pytest.raises(ValueError, match="needs a causal LM \\(GPT\\), got Bert"):
    evaluation.perplexity(bert, bert_params, np.arange(10), context_length=8)
  lines = [{"context": "a", "choices": ["b", "c"], "label": 0}, {"context": "a", "label": 0}]
  path = _write(tmp_path / "bad.jsonl", lines)
  with pytest.raises(ValueError, match=f"{path}:2: no field 'choices'"):
    evaluation.multiple_choice(model, params, TOK, path)
  path = _write(tmp_path / "range.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 2}])
  with pytest.raises(ValueError, match=f"{path}:1: label 2 is out of range for 2 choices"):
    evaluation.multiple_choice(model, params, TOK, path)
  with pytest.raises(ValueError, match="eval task 'bleu:x.jsonl': expected KIND:PATH"):
    evaluation.run_task("bleu:x.jsonl", model, params, TOK)
