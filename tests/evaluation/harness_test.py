"""lm-evaluation-harness against llmjax: the harness's own task code (local task files, no hub)
over a tiny GPT and T5, and each request type equal to this package's scoring called directly
on tokens made by hand the way the harness's HFLM makes them."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from flax import linen as nn
from lm_eval import tasks as lm_tasks
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmjax import checkpoint, decode, evaluation
from llmjax.data import ByteTokenizer
from llmjax.evaluation import harness
from llmjax.models import GPT, GPTConfig, T5, T5Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L = 32  # the GPT's max_seq_len: the long document below spans several rolling windows
CORPUS = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps in the sun",
          "the brown dog and the quick fox are friends", "who jumps over the dog? the fox"]
LONG = " ".join(CORPUS * 3)
MC = [{"question": "Q: what jumps over the dog?\nA:", "choices": ["the fox", "the sun", "a dog"],
       "answer": 0},
      {"question": "Q: who sleeps in the sun?\nA:", "choices": ["the fox", "a lazy dog"],
       "answer": 1}]
ROLLING = [{"text": LONG}, {"text": "the quick fox"}, {"text": "dog"}]
GEN = [{"question": "the quick brown", "answer": " fox"}, {"question": "a lazy", "answer": " dog"}]


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
  """A model checkpoint: a tiny random GPT beside a byte-level BPE tokenizer.json, whose
  merges (" quick", " brown", ...) make the harness's whitespace handling matter."""
  root = tmp_path_factory.mktemp("gpt")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model = GPT(GPTConfig.from_size("tiny", dropout_rate=0.0, max_seq_len=L, vocab_size=320))
  params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
  checkpoint.save_model(str(root), model, params)
  tok.save(str(root / "tokenizer.json"))
  return str(root)


@pytest.fixture(scope="module")
def lm(gpt_dir):
  return harness.LLMJaxLM(checkpoint=gpt_dir, batch_size=4)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """Three local tasks (JSON is YAML) over JSONL files: multiple_choice, loglikelihood_rolling
  and generate_until."""
  root = tmp_path_factory.mktemp("tasks")

  def task(name, docs, **config):
    with open(root / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
    config = {"task": name, "dataset_path": "json", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(root / f"{name}.jsonl")},
                                 "cache_dir": str(root / "hf_cache")}, **config}
    (root / f"{name}.yaml").write_text(json.dumps(config))

  task("llmjax_mc", MC, output_type="multiple_choice", doc_to_text="{{question}}",
       doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
       metric_list=[{"metric": "acc"}])
  task("llmjax_rolling", ROLLING, output_type="loglikelihood_rolling", doc_to_text="",
       doc_to_target="{{text}}", metric_list=[{"metric": m} for m in (
           "word_perplexity", "byte_perplexity", "bits_per_byte")])
  task("llmjax_gen", GEN, output_type="generate_until", doc_to_text="{{question}}",
       doc_to_target="{{answer}}", metric_list=[{"metric": "exact_match"}],
       generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False})
  return str(root)


def _instances(task_dir, name):
  """The task's requests, as lm-eval's own model tests build them."""
  manager = lm_tasks.TaskManager(include_path=task_dir, include_defaults=False)
  task = manager.load(name)["tasks"][name]
  task.build_all_requests(rank=0, world_size=1)
  return task.instances


def _ids(tok, text):
  return [int(i) for i in tok.encode(text)]


def _hflm_pair(tok, context, continuation, prefix):
  """HFLM's tokens of a causal request: trailing spaces join the continuation; the
  continuation is what encoding the whole adds to the context's tokens."""
  if not context:
    return [prefix], _ids(tok, continuation)
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  whole, head = _ids(tok, stripped + continuation), _ids(tok, stripped)
  return head or [prefix], whole[len(head):]


def _request(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_multiple_choice_requests_score_as_loglikelihood_called_directly(lm, task_dir):
  instances = _instances(task_dir, "llmjax_mc")
  assert len(instances) == sum(len(d["choices"]) for d in MC)
  got = lm.loglikelihood(instances)
  pairs = [_hflm_pair(lm.tok, *r.args, lm.prefix_token_id) for r in instances]
  want = evaluation.loglikelihood(lm.model, lm.params, pairs)
  assert all(isinstance(lp, float) and lp < 0 and isinstance(g, bool) for lp, g in got)
  np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], rtol=1e-5)
  assert [g for _, g in got] == [g for _, g in want]


def test_context_whitespace_empty_and_overlong_contexts_are_handled_as_hflm(lm):
  tok, prefix = lm.tok, lm.prefix_token_id
  # The BPE merges " brown": encoding the trailing space with the context would differ.
  assert _ids(tok, "the quick ") + _ids(tok, "brown fox") != _ids(tok, "the quick brown fox")
  cases = [("the quick ", "brown fox"), ("the quick", " brown fox"), ("", "the lazy dog"),
           ("  ", "jumps"), (LONG, " the end")]
  assert len(_ids(tok, LONG)) > 2 * L  # cut from the left to L + 1 tokens
  got = lm.loglikelihood([_request("loglikelihood", *c) for c in cases])
  want = evaluation.loglikelihood(lm.model, lm.params,
                                  [_hflm_pair(tok, *c, prefix) for c in cases])
  np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], rtol=1e-5)
  assert got[0] == got[1]  # the moved space: the same tokens
  assert _hflm_pair(tok, "  ", "jumps", prefix)[0] == [prefix]


def test_rolling_requests_equal_perplexity_and_the_harness_windows(lm, task_dir):
  instances = _instances(task_dir, "llmjax_rolling")
  got = lm.loglikelihood_rolling(instances)
  for (text,), ll in zip((r.args for r in instances), got):
    ids = _ids(lm.tok, text)
    direct = evaluation.perplexity(lm.model, lm.params, np.array([lm.prefix_token_id] + ids),
                                   context_length=L)
    assert direct["tokens"] == len(ids)
    # lm-eval's own windows, each scored as a loglikelihood request of at most L + 1 tokens.
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=ids, prefix_token=lm.prefix_token_id, max_seq_len=L, context_len=1)]
    assert len(windows) == -(-len(ids) // L)
    by_window = sum(lp for lp, _ in evaluation.loglikelihood(lm.model, lm.params, windows))
    np.testing.assert_allclose(ll, -direct["nll"], rtol=1e-5)
    np.testing.assert_allclose(ll, by_window, rtol=1e-5)
  assert len(_ids(lm.tok, LONG)) > 3 * L
  assert lm.loglikelihood_rolling([_request("loglikelihood_rolling", "")]) == [0.0]


def test_generate_until_equals_generate_called_directly(lm, task_dir):
  instances = _instances(task_dir, "llmjax_gen")
  got = lm.generate_until(instances)
  for (context, kwargs), text in zip((r.args for r in instances), got):
    new = decode.generate(lm.model, lm.params, [_ids(lm.tok, context)], kwargs["max_gen_toks"],
                          eos_id=lm.tok.eos_id)[0].tolist()
    new = new[:new.index(lm.tok.eos_id)] if lm.tok.eos_id in new else new
    assert text == lm.tok.decode(new).split("\n")[0]


def test_t5_requests_encode_context_and_continuation_apart(tmp_path):
  model = T5(T5Config.from_size("tiny", dropout_rate=0.0, vocab_size=384))
  params = nn.unbox(model.init(jax.random.key(4), jnp.zeros((1, 4), jnp.int32),
                               jnp.zeros((1, 4), jnp.int32))["params"])
  t5 = harness.LLMJaxLM(model=model, params=params, tokenizer="byte", batch_size=4)
  tok = ByteTokenizer()
  cases = [("translate: the fox ", "le renard"), ("", "hello"), ("question", " answer")]
  got = t5.loglikelihood([_request("loglikelihood", *c) for c in cases])
  want = evaluation.loglikelihood(model, params, [
      (_ids(tok, "translate: the fox") + [tok.eos_id], _ids(tok, " le renard")),
      ([tok.bos_id], _ids(tok, "hello")), (_ids(tok, "question") + [tok.eos_id],
                                           _ids(tok, " answer"))])
  np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], rtol=1e-5)
  (text,) = t5.generate_until([_request("generate_until", "the fox", {"max_gen_toks": 5})])
  new = decode.generate(model, params, [_ids(tok, "the fox") + [tok.eos_id]], 5,
                        eos_id=tok.eos_id)[0].tolist()
  assert text == tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)
  with pytest.raises(ValueError, match=r"perplexity: needs a causal LM"):
    t5.loglikelihood_rolling([_request("loglikelihood_rolling", "the fox")])


def test_simple_evaluate_and_the_command_line_give_the_same_results(gpt_dir, task_dir, tmp_path):
  names = ["llmjax_mc", "llmjax_rolling", "llmjax_gen"]
  manager = lm_tasks.TaskManager(include_path=task_dir, include_defaults=False)
  results = lm_eval.simple_evaluate(model="llmjax", model_args=f"checkpoint={gpt_dir}",
                                    tasks=names, task_manager=manager, batch_size=4)["results"]
  assert 0 <= results["llmjax_mc"]["acc,none"] <= 1
  assert 0 <= results["llmjax_gen"]["exact_match,none"] <= 1
  assert 1 < results["llmjax_rolling"]["word_perplexity,none"] < np.inf
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
  out = subprocess.run(
      [sys.executable, "-m", "llmjax.evaluation.harness", "--model", "llmjax", "--model_args",
       f"checkpoint={gpt_dir}", "--tasks", ",".join(names), "--include_path", task_dir,
       "--batch_size", "4", "--output_path", str(tmp_path / "out")],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  (file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  cli = json.load(open(file))["results"]
  for name in names:
    for metric, value in results[name].items():
      if isinstance(value, float):
        np.testing.assert_allclose(cli[name][metric], value, rtol=1e-5, err_msg=metric)


def test_model_args_are_checked(gpt_dir):
  for bad in ({}, {"model": GPT(GPTConfig.from_size("tiny")), "params": {}}):
    with pytest.raises(ValueError, match=r"give checkpoint=DIR, or model=, params= and tokenizer="):
      harness.LLMJaxLM(**bad)
  with pytest.raises(ValueError, match=r"max_gen_toks=40 leaves no room"):
    harness.LLMJaxLM(checkpoint=gpt_dir).generate_until(
        [_request("generate_until", "the fox", {"max_gen_toks": 40})])
