"""GPT decoding from a KV cache gives, step by step, the full forward pass's logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax.models import GPT, GPTConfig

KEY = functools.partial(jax.random.key, impl="rbg")  # compiles much faster than threefry on CPU
B, MAX_LEN = 2, 8

CASES = {
    "learned": dict(),
    "rope": dict(positions="rope"),
    "rope_gqa_scan": dict(positions="rope", num_kv_heads=2, scan_layers=True),
}


@functools.partial(jax.jit, static_argnums=0)
def _full(cfg, params, tokens):
  return GPT(cfg).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _step(cfg, params, cache, tokens):
  logits, mutated = GPT(cfg, decode=True).apply({"params": params, "cache": cache}, tokens,
                                                 mutable=["cache"])
  return logits, mutated["cache"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_step_by_step_equals_full_forward(case):
  cfg = GPTConfig.from_size("tiny", dropout_rate=0.0, **CASES[case])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, MAX_LEN)),
                       jnp.int32)
  variables = jax.jit(GPT(cfg, decode=True).init)(KEY(0), jnp.zeros((B, MAX_LEN), jnp.int32))
  params, cache = nn.unbox(variables["params"]), variables["cache"]
  # The decoding model has exactly the parameters of the ordinary one.
  plain = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(KEY(0), tokens)["params"]))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain)
  full = np.asarray(_full(cfg, params, tokens))

  # A prefill of 3 tokens, then one token at a time.
  logits, cache = _step(cfg, params, cache, tokens[:, :3])
  np.testing.assert_allclose(logits, full[:, :3], atol=1e-5, rtol=0)
  for t in range(3, MAX_LEN):
    logits, cache = _step(cfg, params, cache, tokens[:, t:t + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"step {t}")
  # Every layer's cache index and the model's position counter have advanced to MAX_LEN.
  counters = [v for k, v in jax.tree_util.tree_leaves_with_path(cache)
              if "cache_index" in jax.tree_util.keystr(k) or "position" in jax.tree_util.keystr(k)]
  assert len(counters) == (2 if cfg.scan_layers else cfg.num_layers + 1)
  assert all((np.asarray(c) == MAX_LEN).all() for c in counters)


def test_decode_cache_shapes():
  """Each layer caches [B, G, max_len, K] keys and values (stacked over layers when scanned)."""
  cfg = GPTConfig.from_size("tiny", positions="rope", num_kv_heads=2, scan_layers=True)
  cache = jax.eval_shape(GPT(cfg, decode=True).init, KEY(0),
                         jnp.zeros((B, MAX_LEN), jnp.int32))["cache"]
  attn = cache["layers"]["attn"]
  assert attn["cached_key"].shape == (cfg.num_layers, B, 2, MAX_LEN, cfg.k)
  assert attn["cached_value"].shape == (cfg.num_layers, B, 2, MAX_LEN, cfg.k)
  assert attn["cache_index"].shape == (cfg.num_layers,)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_feeding_past_the_cache_gives_nan_not_silent_garbage(positions):
  cfg = GPTConfig.from_size("tiny", max_seq_len=6, positions=positions, num_layers=1,
                            dropout_rate=0.0)
  model = GPT(cfg, decode=True)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))
  params, cache = variables["params"], variables["cache"]
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, mutable=["cache"]))
  finite = []
  for i in range(8):
    logits, mutated = step(cache, jnp.array([[i + 1]]))
    cache = mutated["cache"]
    finite.append(bool(np.isfinite(np.asarray(logits)).all()))
  assert finite == [True] * 6 + [False] * 2
