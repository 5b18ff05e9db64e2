"""Tests of llmjax.layers.attention: masks, grouped-query heads, the module's projections."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import layers

B, T, S, H, K = 2, 5, 7, 4, 8
KEY = functools.partial(jax.random.key, impl="rbg")  # compiles much faster than threefry on CPU
# Jitted once per shape: eager op-by-op dispatch costs more than compiling the whole function.
attend = jax.jit(layers.xla_attention, static_argnames=("causal", "dropout_rate"))
mask_of = jax.jit(layers.attention_mask, static_argnames=("causal",))


def _normal(seed, shape):
  """Fixed-seed float32 inputs (numpy: no per-shape compilation of a jax.random kernel)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _qkv(G, seed=0, T=T, S=S):
  return (_normal(seed, (B, T, H, K)), _normal(seed + 1, (B, S, G, K)),
          _normal(seed + 2, (B, S, G, K)))


def _reference_attention(q, k, v, mask, bias, scale):
  """Multi-head attention in numpy with one K/V head per query head (H == G); a query with
  no key outputs 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bthk,bshk->bhts", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  logits = np.where(np.asarray(mask), logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  probs = np.exp(logits - np.where(np.isfinite(top), top, 0))
  total = probs.sum(-1, keepdims=True)  # 0 for a query with no key: its output is 0
  probs = np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)
  return np.einsum("bhts,bshk->bthk", probs, v)


def test_attention_mask_segments_and_padding():
  q_seg = jnp.array([[1, 1, 2, 0]])
  kv_seg = jnp.array([[1, 2, 2, 0, 0]])
  mask = mask_of(q_seg, kv_seg, causal=False)
  assert mask.shape == (1, 1, 4, 5) and mask.dtype == jnp.bool_
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 0, 0, 0, 0],
                       [0, 1, 1, 0, 0],
                       [0, 0, 0, 0, 0]], bool)  # a padding query sees no key
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_attention_mask_causal_within_segments():
  seg = jnp.array([[1, 1, 1, 2, 2]])
  mask = np.asarray(mask_of(seg, seg, causal=True))[0, 0]
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [0, 0, 0, 1, 0],
                       [0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("q_offset", [0, 2, 4])
def test_attention_mask_causal_q_offset(q_offset):
  q_seg, kv_seg = jnp.ones((1, 2), jnp.int32), jnp.ones((1, 6), jnp.int32)
  # mask_of traces q_offset, as while decoding from a cache.
  mask = np.asarray(mask_of(q_seg, kv_seg, causal=True, q_offset=q_offset))[0, 0]
  for t in range(2):
    np.testing.assert_array_equal(mask[t], np.arange(6) <= t + q_offset)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_matches_numpy_reference(causal):
  q, k, v = _qkv(G=H, T=T, S=T)
  seg = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
  bias = _normal(3, (1, H, T, T))
  out = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
                             bias=bias, scale=K ** -0.5)
  mask = mask_of(seg, seg, causal=causal)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, mask, bias, K ** -0.5),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_mha_with_repeated_kv(G, causal):
  """Query head h uses K/V group h // (H // G): the same as MHA with each group repeated."""
  q, k, v = _qkv(G, T=S)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]])
  bias = _normal(5, (B, H, S, S))
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal, bias=bias, scale=0.3)
  grouped = attend(q, k, v, **kw)
  full = attend(q, jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2),
                              **kw)
  np.testing.assert_allclose(grouped, full, atol=1e-6, rtol=1e-6)
  mask = mask_of(seg, seg, causal=causal)
  np.testing.assert_allclose(
      grouped, _reference_attention(q, np.repeat(k, H // G, 2), np.repeat(v, H // G, 2), mask,
                                    bias, 0.3), atol=1e-5, rtol=1e-5)


def test_query_with_no_key_outputs_zero_and_passes_back_nothing():
  """Padding queries (and a query whose segment has no key) output exactly 0, as the kernel
  and its reference do, and no gradient flows through them: finite everywhere."""
  q, k, v = _qkv(G=2)
  q_seg = jnp.array([[1, 1, 1, 1, 0], [1, 1, 2, 0, 0]])
  kv_seg = jnp.ones((B, S), jnp.int32)

  def f(q, k, v):
    return layers.xla_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                causal=False, scale=K ** -0.5)

  out = np.asarray(jax.jit(f)(q, k, v))
  assert np.isfinite(out).all()
  keyless = np.array([[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]], bool)
  assert not out[keyless].any() and np.abs(out[~keyless]).min() > 0
  dq, dk, dv = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
  assert not np.asarray(dq)[keyless].any()
  np.testing.assert_array_equal(dv[1], jax.grad(lambda v: f(q, k, v)[1, :2].sum())(v)[1])


def test_causal_q_offset_equals_rows_of_full_attention():
  """Queries t0..T-1 attending with q_offset=t0 match the same rows of full causal attention."""
  q, k, v = _qkv(G=2, T=S)
  seg = jnp.ones((B, S), jnp.int32)
  full = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                              scale=K ** -0.5)
  t0 = 4
  tail = attend(q[:, t0:], k, v, q_segment_ids=seg[:, t0:], kv_segment_ids=seg,
                              causal=True, scale=K ** -0.5, q_offset=t0)
  np.testing.assert_allclose(tail, full[:, t0:], atol=1e-6)


def test_attention_dropout_needs_rate_and_rng():
  q, k, v = _qkv(G=H)
  seg = jnp.ones((B, T), jnp.int32)
  kv_seg = jnp.ones((B, S), jnp.int32)
  kw = dict(q_segment_ids=seg, kv_segment_ids=kv_seg, causal=False, scale=K ** -0.5)
  plain = attend(q, k, v, **kw)
  dropped = attend(q, k, v, dropout_rate=0.5, dropout_rng=KEY(1), **kw)
  assert not np.allclose(plain, dropped)
  # A rate without an rng is a no-op (deterministic).
  np.testing.assert_array_equal(attend(q, k, v, dropout_rate=0.5, **kw), plain)


def test_attention_module_gqa_params_and_projection():
  """Param shapes follow (D, H, K) / (D, G, K) / (H, K, D), and the module computes
  out_proj(attention(q_proj x, k_proj x, v_proj x))."""
  D, G = 16, 2
  x = _normal(0, (B, T, D))
  seg = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
  attn = layers.Attention(H, G, K)
  params = nn.unbox(jax.jit(lambda k: attn.init(k, x, q_segment_ids=seg, causal=True))(
      KEY(1))["params"])
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {"query_kernel": (D, H, K), "query_bias": (H, K),
                    "key_kernel": (D, G, K), "key_bias": (G, K),
                    "value_kernel": (D, G, K), "value_bias": (G, K),
                    "out_kernel": (H, K, D), "out_bias": (D,)}
  params = jax.tree.map(lambda p: p + 0.1 * _normal(2, p.shape), params)  # non-zero biases

  @jax.jit
  def both(params, x):
    out = attn.apply({"params": params}, x, q_segment_ids=seg, causal=True)
    proj = lambda name: (jnp.einsum("BTD,DHK->BTHK", x, params[f"{name}_kernel"])
                         + params[f"{name}_bias"])
    o = layers.xla_attention(proj("query"), proj("key"), proj("value"), q_segment_ids=seg,
                             kv_segment_ids=seg, causal=True, scale=K ** -0.5)
    return out, jnp.einsum("BTHK,HKD->BTD", o, params["out_kernel"]) + params["out_bias"]

  out, expected = both(params, x)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_attention_module_rejects_bad_heads_and_impl():
  x = jnp.zeros((1, 3, 8))
  seg = jnp.ones((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="num_kv_heads"):
    layers.Attention(4, 3, 2).init(KEY(0), x, q_segment_ids=seg)
  with pytest.raises(ValueError, match="impl"):
    layers.Attention(4, 4, 2, impl="nope").init(KEY(0), x, q_segment_ids=seg)
  with pytest.raises(ValueError, match="positions"):
    layers.Attention(4, 4, 2, rope_theta=1e4).init(KEY(0), x, q_segment_ids=seg)
