"""perplexity and loglikelihood against transformers computed in PyTorch (random GPT-2 and T5
through hf.load, float32), and invariance to batch size and device count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llmjax import evaluation, hf, sharding

from tests import hf_reference  # needs the test extra: torch (CPU) and transformers

STREAM = np.random.default_rng(0).integers(0, hf_reference.VOCAB, 150)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{name: (torch model, llmjax model, params)} for GPT-2 and T5 v1.1."""
  out = {}
  for name, make in (("gpt2", hf_reference.make_gpt2),
                     ("t5", lambda p: hf_reference.make_t5(p, "1.1"))):
    path = str(tmp_path_factory.mktemp(name))
    out[name] = (make(path).model.eval(), *hf.load(path))
  return out


def _torch_strided_nll(torch_model, ids, max_length, stride):
  """transformers' strided perplexity (its docs' loop, the loss's own count of targets): the
  summed nll and the number of tokens scored."""
  nll, count, prev_end = 0.0, 0, 0
  for begin in range(0, len(ids), stride):
    end = min(begin + max_length, len(ids))
    trg_len = end - prev_end
    input_ids = torch.tensor([ids[begin:end]])
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
      loss = torch_model(input_ids, labels=target_ids).loss.item()
    n = int((target_ids[:, 1:] != -100).sum())  # the loss averages over the shifted labels
    nll, count, prev_end = nll + loss * n, count + n, end
    if end == len(ids):
      break
  return nll, count


@pytest.mark.parametrize("context_length,stride", [(16, 8), (40, 7), (64, 48)])
def test_strided_perplexity_equals_transformers(checkpoints, context_length, stride):
  torch_model, model, params = checkpoints["gpt2"]
  r = evaluation.perplexity(model, params, STREAM, context_length=context_length, stride=stride)
  nll, count = _torch_strided_nll(torch_model, STREAM.tolist(), context_length, stride)
  assert r["tokens"] == count == len(STREAM) - 1
  np.testing.assert_allclose(r["nll"], nll, rtol=1e-4)
  np.testing.assert_allclose(r["perplexity"], np.exp(nll / count), rtol=1e-4)


def _torch_loglikelihood(torch_model, context, continuation):
  """(sum of log p(continuation), greedy) from one unpadded forward pass in PyTorch."""
  with torch.no_grad():
    if torch_model.config.is_encoder_decoder:
      logits = torch_model(input_ids=torch.tensor([context]),
                           decoder_input_ids=torch.tensor([[0] + continuation[:-1]])).logits[0]
    else:
      whole = (context + continuation)[-(hf_reference.MAX_POS + 1):]
      logits = torch_model(torch.tensor([whole[:-1]])).logits[0, -len(continuation):]
  logp = torch.log_softmax(logits.double(), -1)
  target = torch.tensor(continuation)
  return (float(logp[torch.arange(len(continuation)), target].sum()),
          bool((logits.argmax(-1) == target).all()))


def _greedy(torch_model, context, n):
  """The n tokens that greedy decoding continues `context` with (so some requests are greedy)."""
  with torch.no_grad():
    if torch_model.config.is_encoder_decoder:
      out = torch_model.generate(torch.tensor([context]), max_new_tokens=n, do_sample=False,
                                 decoder_start_token_id=0, eos_token_id=None, pad_token_id=0)
      return out[0, 1:].tolist()
    out = torch_model.generate(torch.tensor([context]), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    return out[0, len(context):].tolist()


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_loglikelihood_equals_transformers_over_mixed_lengths(checkpoints, name):
  torch_model, model, params = checkpoints[name]
  rng = np.random.default_rng(1)
  requests = [(rng.integers(0, 300, n).tolist(), rng.integers(0, 300, m).tolist())
              for n, m in ((3, 1), (20, 6), (1, 9), (70, 5), (11, 2))]  # 70 + 5 > MAX_POS
  requests += [(c, _greedy(torch_model, c, m)) for c, m in (([5, 9, 200], 1), ([7] * 12, 4))]
  got = evaluation.loglikelihood(model, params, requests, batch_size=3)
  for (context, continuation), (lp, greedy) in zip(requests, got):
    want_lp, want_greedy = _torch_loglikelihood(torch_model, context, continuation)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-4)
    assert greedy == want_greedy
  assert [g for _, g in got[-2:]] == [True, True]
  again = evaluation.loglikelihood(model, params, requests, batch_size=16)
  np.testing.assert_allclose([lp for lp, _ in again], [lp for lp, _ in got], rtol=1e-5)
  assert [g for _, g in again] == [g for _, g in got]


def test_scores_do_not_depend_on_batch_size_or_devices(checkpoints):
  _, model, params = checkpoints["gpt2"]
  mesh = sharding.make_mesh((2, 2, 2))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  placed = jax.device_put(params, sharding.logical_sharding(abstract["params"], mesh))
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(placed))
  base = evaluation.perplexity(model, params, STREAM, context_length=32, batch_size=1)
  for p, b in ((params, 8), (placed, 8), (placed, 3)):
    r = evaluation.perplexity(model, p, STREAM, context_length=32, batch_size=b)
    assert r["tokens"] == base["tokens"]
    np.testing.assert_allclose(r["nll"], base["nll"], rtol=1e-5)
  requests = [([1, 2, 3], [4, 5]), ([9] * 30, [8])]
  np.testing.assert_allclose(evaluation.loglikelihood(model, placed, requests),
                             evaluation.loglikelihood(model, params, requests), rtol=1e-5)


def test_rolling_windows_score_every_token_once_with_full_windows(checkpoints):
  """stride=None: disjoint runs of targets, each window as long as the stream allows; the
  last one reaches back. Against a direct sum over the same windows in PyTorch."""
  torch_model, model, params = checkpoints["gpt2"]
  ids, C = STREAM[:100].tolist(), 32
  want = 0.0
  for first in range(1, len(ids), C):
    end = min(first + C, len(ids))
    start = max(0, end - 1 - C)
    with torch.no_grad():
      logits = torch_model(torch.tensor([ids[start:end - 1]])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    want += sum(float(logp[j - start - 1, ids[j]]) for j in range(first, end))
  r = evaluation.perplexity(model, params, ids, context_length=C, text="a b  c")
  assert r["tokens"] == len(ids) - 1
  np.testing.assert_allclose(r["nll"], -want, rtol=1e-4)
  np.testing.assert_allclose(r["word_perplexity"], np.exp(-want / 3), rtol=1e-4)
  np.testing.assert_allclose(r["bits_per_byte"], -want / 6 / np.log(2), rtol=1e-4)
