"""lm-evaluation-harness's own tasks run against llmjax models (the `eval` extra: lm-eval).

    python -m llmjax.evaluation.harness --model llmjax --model_args checkpoint=DIR \
        --tasks hellaswag --batch_size 16
    lm_eval --model llmjax ...    # lm-eval releases that load `lm_eval.models` entry points

lm-eval 0.4.13 knows only its registry's models: running this module registers `llmjax` and runs
lm-eval's command line; importing it registers it for `simple_evaluate`. Requests go to
`evaluation.loglikelihood`, `evaluation.perplexity` (stride=None: the harness's rolling windows
over [prefix] + the document) and `decode.generate`, tokenized as HFLM does
(evaluation.encode_pair's rules)."""

from __future__ import annotations

import itertools

import lm_eval.models  # noqa: F401  the harness's own models, registered before ours
import numpy as np
from lm_eval.api import registry
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text

from llmjax import checkpoint as ckpt, data, decode, evaluation
from llmjax.models import GPT


class LLMJaxLM(TemplateLM):
  """A GPT or T5 as an lm-eval model. model_args: checkpoint=DIR (`checkpoint.load_model`),
  tokenizer=SPEC (default: the checkpoint's), batch_size, max_length (of rolling windows and
  of prompt + generation; default GPT max_seq_len, T5 512), prefix_token_id (default BOS,
  else EOS); from Python, model=, params= and tokenizer= objects instead of checkpoint."""

  def __init__(self, checkpoint: str | None = None, tokenizer=None, batch_size=16,
               max_length: int | None = None, prefix_token_id: int | None = None, *,
               model=None, params=None, device=None, max_batch_size=None):
    super().__init__()
    del device, max_batch_size  # JAX places the parameters; batches have one fixed size
    if (checkpoint is None) == (model is None) or (model is not None and tokenizer is None):
      raise ValueError("llmjax model_args: give checkpoint=DIR, or model=, params= and tokenizer=")
    if checkpoint is not None:
      model, params = ckpt.load_model(checkpoint)
    tokenizer = ckpt.load_tokenizer(checkpoint) if tokenizer is None else tokenizer
    self.tok = data.load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    self.model, self.params = model, params
    self.backend = "causal" if isinstance(model, GPT) else "seq2seq"
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto", "auto:N"
    self.max_length = int(max_length or getattr(model.cfg, "max_seq_len", 512))
    bos_or_eos = self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id
    self._prefix = int(bos_or_eos if prefix_token_id is None else prefix_token_id)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
    ids = [int(i) for i in self.tok.encode(string)]
    if self.backend == "seq2seq" and add_special_tokens is not False:
      ids.append(self.tok.eos_id)
    return ids

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
    # The prefix token stands in for an empty context (or one of whitespace only, once moved).
    pairs = [(context or [self.prefix_token_id], continuation)
             for _, context, continuation in requests]
    return evaluation.loglikelihood(self.model, self.params, pairs, batch_size=self.batch_size)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    out = []
    for (text,) in (r.args for r in requests):
      ids = [self.prefix_token_id] + self.tok_encode(text)
      out.append(0.0 if len(ids) < 2 else -evaluation.perplexity(
          self.model, self.params, np.asarray(ids), context_length=self.max_length,
          batch_size=self.batch_size)["nll"])
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for gen_kwargs, group in itertools.groupby((r.args for r in requests), key=lambda a: a[1]):
      kw = normalize_gen_kwargs(gen_kwargs, 256)
      n_new = kw["max_gen_toks"]
      room = self.max_length - n_new if self.backend == "causal" else self.max_length
      if room < 1:
        raise ValueError(f"llmjax: max_gen_toks={n_new} leaves no room for a prompt within "
                         f"max_length={self.max_length}")
      prompts = [self.tok_encode(context)[-room:] or [self.prefix_token_id]
                 for context, _ in group]
      for b in range(0, len(prompts), self.batch_size):
        new_BN = decode.generate(
            self.model, self.params, prompts[b:b + self.batch_size], n_new,
            temperature=float(kw.get("temperature", 1.0 if kw["do_sample"] else 0.0)),
            top_k=kw.get("top_k"), top_p=kw.get("top_p"), eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id or 0)
        for row in np.asarray(new_BN).tolist():
          row = row[:row.index(self.tok.eos_id)] if self.tok.eos_id in row else row
          out.append(postprocess_generated_text(self.tok.decode(row), kw["until"], None))
    return out


# Under `python -m` this module runs as __main__; the entry point's copy may have come first.
if "llmjax" not in registry.model_registry:
  registry.register_model("llmjax")(LLMJaxLM)

if __name__ == "__main__":  # lm-eval's own command line, `--model llmjax` registered
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()
