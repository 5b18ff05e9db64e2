"""Evaluation tasks over files, and the specs KIND:PATH[:METRIC] that name them (by the file's
stem; train.eval_tasks, tools/evaluate.py):

    perplexity:val.txt          the text's rolling-window perplexity (a GPT; scoring.perplexity)
    multiple_choice:mc.jsonl    {"context", "choices", "label"} lines: acc, acc_norm
    seq2seq:pairs.jsonl:bleu    {"input", "target"} lines, greedy generations scored by
                                exact_match, bleu or rouge (a GPT continues, a T5 answers)
    pll:sentences.txt           BERT: mean pseudo-log-likelihood per sentence, one per line
    mlm_accuracy:sentences.txt  BERT: accuracy on 15% of each line's tokens, masked

Scores are on lm-evaluation-harness's, sacrebleu's and rouge-score's terms; BLEU, ROUGE and
exact match in percent, as T5 reports them."""

from __future__ import annotations

import json
import re

import numpy as np

from llmjax import decode, paths
from llmjax.evaluation import scoring
from llmjax.models.bert import Bert
from llmjax.models.t5 import T5

_FIELDS = {"multiple_choice": {"context": str, "choices": list, "label": int},
           "seq2seq": {"input": str, "target": str}}
_METRICS = ("exact_match", "bleu", "rouge")


def read_jsonl(path: str, fields: dict[str, type]) -> list[dict]:
  """The records of a JSONL file, each checked to have `fields` of their types (file:line named)."""
  records = []
  for i, line in enumerate(paths.path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    for name, kind in fields.items():
      if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{path}:{i}: no field {name!r}; expected fields {sorted(fields)}")
      if not isinstance(record[name], kind) or isinstance(record[name], bool):
        raise ValueError(f"{path}:{i}: field {name!r} is {record[name]!r}; expected a "
                         f"{kind.__name__}")
    records.append(record)
  if not records:
    raise ValueError(f"{path}: no records")
  return records


def encode_pair(tokenizer, context: str, continuation: str, seq2seq: bool):
  """Token ids of (context, continuation) as lm-evaluation-harness's HFLM makes them: trailing
  whitespace moves to the continuation; a decoder's continuation is what encoding the whole
  adds to the context (BOS, else EOS, for an empty one); a seq2seq context ends in EOS."""
  prefix = next((t for t in (tokenizer.bos_id, tokenizer.eos_id) if t is not None), None)
  if not context and not seq2seq and prefix is not None:  # HFLM's prefix token
    return [prefix], list(tokenizer.encode(continuation))
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  context_ids = list(tokenizer.encode(context))
  if seq2seq:
    return _with_eos(tokenizer, context_ids), list(tokenizer.encode(continuation))
  return context_ids, list(tokenizer.encode(context + continuation))[len(context_ids):]


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
  """A T5 encoder's input ends in EOS, as in training (HF's T5 tokenizers add it themselves)."""
  eos = tokenizer.eos_id
  return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids


def multiple_choice(model, params, tokenizer, task, *, batch_size: int = 16) -> dict:
  """acc and acc_norm (log-likelihood over the choice's characters) of a task: a JSONL path or
  records {"context", "choices", "label"}; each choice follows the context after a space."""
  records = read_jsonl(task, _FIELDS["multiple_choice"]) if isinstance(task, str) else task
  requests = []
  for i, r in enumerate(records, 1):
    if not r["choices"] or not 0 <= r["label"] < len(r["choices"]):
      raise ValueError(f"{task if isinstance(task, str) else 'record'}:{i}: label {r['label']} "
                       f"is out of range for {len(r['choices'])} choices")
    requests += [encode_pair(tokenizer, r["context"], " " + c, isinstance(model, T5))
                 for c in r["choices"]]
  lls = iter(scoring.loglikelihood(model, params, requests, batch_size=batch_size))
  acc = acc_norm = 0
  for r in records:
    lp = np.array([next(lls)[0] for _ in r["choices"]])
    acc += int(np.argmax(lp) == r["label"])
    acc_norm += int(np.argmax(lp / np.array([len(c) for c in r["choices"]])) == r["label"])
  return {"acc": acc / len(records), "acc_norm": acc_norm / len(records), "count": len(records)}


def exact_match(predictions, references) -> float:
  """Percent of predictions equal to their reference, surrounding whitespace aside."""
  return 100.0 * np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)])


def bleu(predictions, references) -> float:
  """Corpus BLEU by sacrebleu with T5's settings: the "intl" tokenizer, exponential smoothing."""
  import sacrebleu
  return sacrebleu.corpus_bleu(predictions, [references], tokenize="intl",
                               smooth_method="exp").score


class UnicodeTokenizer:
  """rouge-score's tokenizer interface, lower-cased words of any script (its default keeps only
  [a-z0-9], which cuts "não" into "n o")."""

  def tokenize(self, text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge(predictions, references) -> dict[str, float]:
  """Mean ROUGE-1/2/Lsum F-measures in percent by rouge-score, with the Unicode tokenizer
  (Lsum splits summaries into sentences at newlines)."""
  from rouge_score import rouge_scorer
  keys = ("rouge1", "rouge2", "rougeLsum")
  scorer = rouge_scorer.RougeScorer(keys, tokenizer=UnicodeTokenizer())
  scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
  return {k: 100.0 * float(np.mean([s[k].fmeasure for s in scores])) for k in keys}


def seq2seq(model, params, tokenizer, task, *, metric: str = "exact_match",
            max_new_tokens: int | None = None, batch_size: int = 16) -> dict:
  """`metric` of the greedy generations (to EOS) for {"input", "target"} records (a JSONL path or
  list); at most `max_new_tokens` (default 64, or what a GPT's learned positions leave)."""
  if metric not in _METRICS:
    raise ValueError(f"seq2seq: metric={metric!r}; expected one of {', '.join(_METRICS)}")
  records = read_jsonl(task, _FIELDS["seq2seq"]) if isinstance(task, str) else task
  predictions = []
  for b in range(0, len(records), batch_size):
    prompts = [list(tokenizer.encode(r["input"])) for r in records[b:b + batch_size]]
    prompts = [_with_eos(tokenizer, p) for p in prompts] if isinstance(model, T5) else prompts
    n = max_new_tokens or 64
    if max_new_tokens is None and getattr(model.cfg, "positions", None) == "learned":
      n = max(1, min(n, model.cfg.max_seq_len - max(len(p) for p in prompts)))
    out = np.asarray(decode.generate(model, params, prompts, n,
                                     eos_id=tokenizer.eos_id, pad_id=0))
    for row in out:
      ends = np.flatnonzero(row == tokenizer.eos_id) if tokenizer.eos_id is not None else []
      predictions.append(tokenizer.decode(row[:ends[0]] if len(ends) else row))
  scores = {"exact_match": exact_match, "bleu": bleu, "rouge": rouge}[metric](
      predictions, [r["target"] for r in records])
  return {**(scores if isinstance(scores, dict) else {metric: scores}), "count": len(records)}


def _masked_rows(model, sentences, mask_id: int, skip_ids, choose):
  """(masked tokens, targets, weights) rows: `choose(positions)` gives the sets of a sentence's
  positions (never skip_ids tokens) to mask together."""
  if not isinstance(model, Bert) or model.cfg.head == "none":
    raise ValueError(f"needs a BERT with its MLM head, got {type(model).__name__}")
  rows, owner = [], []
  for i, s in enumerate(sentences):
    s = np.asarray(s, np.int32).reshape(-1)
    for positions in choose(np.flatnonzero(~np.isin(s, list(skip_ids)))):
      w = np.zeros(s.size, np.float32)
      w[positions] = 1.0
      rows.append((np.where(w > 0, mask_id, s), s, w))
      owner.append(i)
  return rows, owner


def pseudo_log_likelihood(model, params, sentences, *, mask_id: int = decode.BERT_MASK_ID,
                          skip_ids=(101, 102), batch_size: int = 32) -> list[float]:
  """Salazar et al.'s PLL of each sentence (token ids): sum over its tokens (but skip_ids, BERT's
  [CLS] and [SEP]) of log p(token | the sentence with that token masked)."""
  rows, owner = _masked_rows(model, sentences, mask_id, skip_ids,
                             lambda scorable: [[p] for p in scorable])
  out = np.zeros(len(sentences))
  for i, (lp, _, _) in zip(owner, scoring.score_rows(model, params, rows, batch_size)):
    out[i] += lp
  return out.tolist()


def mlm_accuracy(model, params, sentences, *, rate: float = 0.15, seed: int = 0,
                 mask_id: int = decode.BERT_MASK_ID, skip_ids=(101, 102),
                 batch_size: int = 32) -> dict:
  """Argmax accuracy at `rate` of each sentence's tokens (>= 1, by `seed`), masked together."""
  rng = np.random.default_rng(seed)
  rows, _ = _masked_rows(model, sentences, mask_id, skip_ids, lambda scorable: [
      rng.choice(scorable, max(1, round(rate * len(scorable))), replace=False)])
  sums = np.sum([s[1:] for s in scoring.score_rows(model, params, rows, batch_size)], 0)
  return {"accuracy": float(sums[0] / sums[1]), "tokens": int(sums[1])}


_KINDS = ("perplexity", "multiple_choice", "seq2seq", "pll", "mlm_accuracy")


def parse(spec: str) -> tuple[str, str, str]:
  """(kind, path, metric) of a task spec KIND:PATH[:METRIC], checked, its file found."""
  kind, _, path = spec.partition(":")
  head, _, metric = path.rpartition(":")
  path, metric = ((head, metric) if head and "/" not in metric else (path, "exact_match")
                  ) if kind == "seq2seq" else (path, "")
  if kind not in _KINDS or not path or (kind == "seq2seq" and metric not in _METRICS):
    raise ValueError(f"eval task {spec!r}: expected KIND:PATH with KIND one of "
                     f"{', '.join(_KINDS)} (seq2seq:PATH:METRIC, METRIC one of {_METRICS})")
  if not paths.path(path).is_file():
    raise ValueError(f"eval task {spec!r}: no file {path}")
  return kind, path, metric


def run(spec: str, model, params, tokenizer, *, batch_size: int = 16) -> tuple[str, dict]:
  """(task name: the file's stem, its metrics) of a task spec (see the module docstring)."""
  kind, path, metric = parse(spec)
  name = paths.path(path).stem
  if kind == "multiple_choice":
    return name, multiple_choice(model, params, tokenizer, path, batch_size=batch_size)
  if kind == "seq2seq":
    return name, seq2seq(model, params, tokenizer, path, metric=metric, batch_size=batch_size)
  text = paths.path(path).read_text()
  if kind == "perplexity":
    return name, scoring.perplexity(model, params, tokenizer.encode(text), batch_size=batch_size,
                                    context_length=model.cfg.max_seq_len, text=text)
  lines = [tokenizer.encode(t) for t in text.splitlines() if t.strip()]
  ids = dict(skip_ids=[t for t in (tokenizer.cls_id, tokenizer.sep_id) if t is not None],
             mask_id=decode.BERT_MASK_ID if tokenizer.mask_id is None else tokenizer.mask_id)
  if kind == "pll":
    pll = pseudo_log_likelihood(model, params, lines, batch_size=batch_size, **ids)
    return name, {"pll": float(np.mean(pll)), "count": len(lines)}
  return name, mlm_accuracy(model, params, lines, batch_size=batch_size, **ids)
