"""Invariants of the compiled generation loop: cache == no cache, ragged rows, one compile,
one prefill pass, sharded == unsharded, and requests refused before any work."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import decode, sharding
from llmjax.decode import generation
from llmjax.models import Bert, BertConfig, GPT, GPTConfig, T5, T5Config

PROMPTS = [[5, 17, 33, 8, 250], [44, 12], [7, 7, 120, 64, 3, 199, 30, 11, 9]]
GPT_CASES = {
    "learned": dict(),
    "sinusoidal": dict(positions="sinusoidal"),
    "rope_gqa_scan": dict(positions="rope", num_kv_heads=2, scan_layers=True),
    "bf16": dict(dtype="bfloat16", num_kv_heads=1),
}
T5_CASES = {"t5": dict(), "t5_gqa_scan": dict(num_kv_heads=2, scan_layers=True)}


@functools.lru_cache(maxsize=None)
def _model(case):
  if case in T5_CASES:
    model = T5(T5Config.from_size("tiny", dropout_rate=0.0, **T5_CASES[case]))
    args = (jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))
  else:
    model = GPT(GPTConfig.from_size("tiny", dropout_rate=0.0, max_seq_len=64, **GPT_CASES[case]))
    args = (jnp.zeros((1, 4), jnp.int32),)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(1), *args)["params"])


@pytest.mark.parametrize("case", sorted(GPT_CASES) + sorted(T5_CASES))
def test_cached_logits_equal_the_full_forward_pass_at_every_step(case):
  """A ragged batch prefilled in one pass, then fed 5 tokens one at a time: each step's
  logits equal a full forward pass over that row alone, unpadded."""
  model, params = _model(case)
  is_gpt, N = isinstance(model, GPT), 5
  cont_BN = np.random.default_rng(0).integers(1, 256, (len(PROMPTS), N)).astype(np.int32)
  P = max(map(len, PROMPTS))
  tokens_BP, seg_BP = np.zeros((3, P), np.int32), np.zeros((3, P), np.int32)
  for b, row in enumerate(PROMPTS):
    at = slice(P - len(row), P) if is_gpt else slice(0, len(row))
    tokens_BP[b, at], seg_BP[b, at] = row, 1

  @jax.jit
  def stepwise(params, tokens_BP, seg_BP, cont_BN):
    dec = model.clone(decode=True)
    if is_gpt:
      logits_BV, cache, step = generation._prefill_gpt(dec, params, tokens_BP, seg_BP, P + N, 1)
    else:
      logits_BV, cache, step = generation._prefill_t5(dec, params, tokens_BP, seg_BP, N, 1, 0)
    out = [logits_BV]
    for i in range(1, N):
      logits_BV, cache = step(cache, cont_BN[:, i - 1], i)
      out.append(logits_BV)
    return jnp.stack(out, axis=1)

  # The reference: every row unpadded at the start (right padding, which nothing real sees).
  full_tokens, full_seg = np.zeros((3, P + N), np.int32), np.zeros((3, P + N), np.int32)
  for b, row in enumerate(PROMPTS):
    full_tokens[b, :len(row) + N] = row + cont_BN[b].tolist()
    full_seg[b, :len(row) + N] = 1
  if is_gpt:
    full_BTV = jax.jit(model.apply)({"params": params}, full_tokens, full_seg)
  else:
    decoder_BN = np.concatenate([np.zeros((3, 1), np.int32), cont_BN[:, :-1]], axis=1)
    full_BTV = jax.jit(model.apply)({"params": params}, tokens_BP, decoder_BN, seg_BP)
  cached_BNV = np.asarray(stepwise(params, tokens_BP, seg_BP, cont_BN), np.float32)
  tol = 5e-2 if case == "bf16" else 1e-5
  for b, row in enumerate(PROMPTS):
    full_NV = full_BTV[b, len(row) - 1:len(row) - 1 + N] if is_gpt else full_BTV[b]
    np.testing.assert_allclose(cached_BNV[b], np.asarray(full_NV, np.float32), atol=tol, rtol=0,
                               err_msg=f"row {b}")


def test_ragged_rows_equal_rows_alone_and_eos_pads():
  model, params = _model("rope_gqa_scan")
  batch = np.asarray(decode.generate(model, params, PROMPTS, 10))
  for b, row in enumerate(PROMPTS):
    np.testing.assert_array_equal(decode.generate(model, params, [row], 10)[0], batch[b])
  eos = int(batch[1, 3])  # row 1 emits it at step 3 (maybe earlier too)
  stopped = np.asarray(decode.generate(model, params, PROMPTS, 10, eos_id=eos, pad_id=0))
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(batch[b] == eos)
    end = hits[0] + 1 if hits.size else 10
    np.testing.assert_array_equal(stopped[b, :end], batch[b, :end])
    assert (stopped[b, end:] == 0).all()


def test_one_compilation_per_length_bucket_and_one_prefill_pass(monkeypatch):
  model, params = _model("learned")
  generation._generate.cache_clear()
  shapes = []  # the token shapes the model is traced with
  apply = generation._apply
  monkeypatch.setattr(generation, "_apply",
                      lambda m, p, c, *args, **kw: shapes.append(
                          args[1 if isinstance(m, T5) else 0].shape) or apply(m, p, c, *args, **kw))
  before = decode.TRACES["generate"]
  outs = [decode.generate(model, params, [[1] * n, [2] * (n + 1)], new, temperature=0.5,
                          top_k=7, rng=jax.random.key(n))
          for n, new in ((3, 5), (9, 16), (15, 11))]
  assert decode.TRACES["generate"] == before + 1
  assert [o.shape for o in outs] == [(2, 5), (2, 16), (2, 11)]
  # Prompts of up to 16 tokens are padded to 16 and fed in one pass; then one token per step.
  assert shapes == [(2, 16), (2, 1)]
  decode.generate(model, params, [[1] * 17], 5)  # the next prompt bucket compiles anew
  assert decode.TRACES["generate"] == before + 2


def test_sampling_is_reproducible_from_rng():
  model, params = _model("learned")
  kw = dict(temperature=1.0, top_p=0.9)
  a = decode.generate(model, params, PROMPTS, 12, rng=jax.random.key(3), **kw)
  np.testing.assert_array_equal(a, decode.generate(model, params, PROMPTS, 12,
                                                   rng=jax.random.key(3), **kw))
  assert (a != decode.generate(model, params, PROMPTS, 12, rng=jax.random.key(4), **kw)).any()


@pytest.mark.parametrize("case,num_beams", [("rope_gqa_scan", 3), ("t5", 1)])
def test_sharded_equals_unsharded(case, num_beams):
  """Parameters placed by their logical axes on a (2, 2, 2) mesh, the batch over data x fsdp."""
  model, params = _model(case)
  prompts = PROMPTS + [[9, 8, 7]]
  expected = decode.generate(model, params, prompts, 8, num_beams=num_beams, eos_id=3)
  mesh = sharding.make_mesh((2, 2, 2))
  args = ((jnp.zeros((1, 4), jnp.int32),) * (2 if isinstance(model, T5) else 1))
  shardings = sharding.logical_sharding(
      jax.eval_shape(model.init, jax.random.key(0), *args)["params"], mesh)
  placed = jax.device_put(params, shardings)
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(placed))
  got = decode.generate(model, placed, prompts, 8, num_beams=num_beams, eos_id=3)
  np.testing.assert_array_equal(got, expected)


def _bad_requests():
  gpt, t5 = _model("learned"), _model("t5")
  bert = (Bert(BertConfig.from_size("tiny")), None)
  return [
      (gpt, dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
      (gpt, dict(prompts=[[1] * 60], max_new_tokens=5), "beyond the model's 64 learned"),
      (gpt, dict(prompts=[[1, 256]]), "token id 256, outside"),
      (t5, dict(prompts=[[1, -1]]), "token id -1, outside"),
      (gpt, dict(top_p=0.0), "top_p=0.0"),
      (gpt, dict(top_p=1.5), "top_p=1.5"),
      (gpt, dict(temperature=-0.1), "temperature=-0.1"),
      (gpt, dict(top_k=-1), "top_k=-1"),
      (gpt, dict(num_beams=0), "num_beams=0"),
      (gpt, dict(num_beams=2, temperature=0.7), "beam search is deterministic"),
      (gpt, dict(max_new_tokens=0), "max_new_tokens=0"),
      (gpt, dict(prompts=np.zeros((2, 3, 1), np.int32)), "of shape (2, 3, 1)"),
      (bert, dict(), "Bert is not a generative model"),
  ]


def test_bad_requests_are_refused_before_any_work():
  before = decode.TRACES["generate"]
  for (model, params), kw, message in _bad_requests():
    kw = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      decode.generate(model, params, kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)
  assert decode.TRACES["generate"] == before


@pytest.mark.parametrize("case,num_beams", [("rope_gqa_scan", 2)])
def test_long_generation_in_stages_equals_one_stage(monkeypatch, case, num_beams):
  """Past 128 new tokens the loop runs in stages that attend over a widening part of the
  cache (64, 128, 256); the tokens are those of one stage over the whole cache."""
  model, params = _model(case)
  assert generation._stage_ends(256) == [64, 128, 256]
  staged = decode.generate(model, params, PROMPTS[:2], 130, num_beams=num_beams)
  monkeypatch.setattr(generation, "_stage_ends", lambda N: [N])
  generation._generate.cache_clear()
  np.testing.assert_array_equal(staged, decode.generate(model, params, PROMPTS[:2], 130,
                                                        num_beams=num_beams))
