"""Tests of llmjax.layers.positions and relative_bias: packed positions, rotary and sinusoidal
embeddings, and T5's relative-position buckets against an independent implementation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import layers

KEY = functools.partial(jax.random.key, impl="rbg")  # compiles much faster than threefry on CPU
rope = jax.jit(layers.apply_rope, static_argnames=("theta",))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --------------------------------------------------------------------------------------
# segment_positions


def test_segment_positions_on_packed_rows():
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0],
                   [1, 1, 1, 1, 1, 1, 1],
                   [3, 3, 5, 5, 5, 5, 0],
                   [1, 2, 3, 4, 0, 0, 0]])
  expected = np.array([[0, 1, 2, 0, 1, 0, 1],
                       [0, 1, 2, 3, 4, 5, 6],
                       [0, 1, 0, 1, 2, 3, 0],
                       [0, 0, 0, 0, 0, 1, 2]])
  pos = jax.jit(layers.segment_positions)(seg)
  assert pos.dtype == jnp.int32
  np.testing.assert_array_equal(pos, expected)


def test_segment_positions_rows_are_independent():
  """A row's positions do not depend on the other rows (the cummax runs along length only)."""
  seg = jnp.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]])
  pos = layers.segment_positions(seg)
  np.testing.assert_array_equal(pos[1], layers.segment_positions(seg[1:])[0])
  np.testing.assert_array_equal(pos[0], layers.segment_positions(seg[:1])[0])


# --------------------------------------------------------------------------------------
# Rotary embeddings


def _numpy_rope(x, positions, theta):
  """Rotate-half RoPE in float64: pairs (i, i + K/2) rotate as complex numbers by p * w_i."""
  x = np.asarray(x, np.float64)
  K = x.shape[-1]
  w = theta ** (-np.arange(0, K, 2) / K)
  angle = np.asarray(positions, np.float64)[:, :, None, None] * w
  z = (x[..., :K // 2] + 1j * x[..., K // 2:]) * np.exp(1j * angle)
  return np.concatenate([z.real, z.imag], -1)


def test_rope_matches_complex_rotation_and_is_identity_at_zero():
  x = _normal(0, (2, 6, 3, 8))
  pos = jnp.array([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 100]])
  out = rope(x, pos, theta=10_000.0)
  np.testing.assert_allclose(out, _numpy_rope(x, pos, 10_000.0), atol=2e-5)
  np.testing.assert_allclose(rope(x, jnp.zeros((2, 6), jnp.int32), theta=10_000.0), x, atol=0)


def test_rope_preserves_norms():
  x = _normal(1, (2, 5, 4, 16))
  pos = jnp.asarray(np.random.default_rng(2).integers(0, 5000, (2, 5)))
  out = rope(x, pos, theta=10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)


@pytest.mark.parametrize("theta", [10_000.0, 500.0])
def test_rope_scores_depend_only_on_relative_position(theta):
  """rope(q, m) . rope(k, n) is a function of m - n: shifting both positions changes nothing."""
  q, k = _normal(3, (1, 1, 2, 16)), _normal(4, (1, 1, 2, 16))
  score = lambda m, n: jnp.einsum("bthk,bthk->h", rope(q, jnp.array([[m]]), theta=theta),
                                  rope(k, jnp.array([[n]]), theta=theta))
  for m, n in [(0, 0), (5, 2), (2, 5), (17, 3)]:
    base = score(m, n)
    for shift in (1, 7, 1000):
      np.testing.assert_allclose(score(m + shift, n + shift), base, atol=1e-4, rtol=1e-4)
  # ... and does depend on the distance.
  assert not np.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_keeps_dtype_and_rejects_odd_head_dim():
  x = _normal(5, (1, 3, 2, 8)).astype(jnp.bfloat16)
  assert layers.apply_rope(x, jnp.zeros((1, 3), jnp.int32)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="even head dim"):
    layers.apply_rope(jnp.zeros((1, 3, 2, 7)), jnp.zeros((1, 3), jnp.int32))


# --------------------------------------------------------------------------------------
# Sinusoidal and learned positions


def test_sinusoidal_shape_and_values():
  F = 10
  pos = jnp.array([[0, 1, 2], [0, 7, 300]])
  out = layers.sinusoidal(pos, F)
  assert out.shape == (2, 3, F) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out[:, 0], np.tile(np.r_[np.zeros(F // 2), np.ones(F // 2)],
                                                   (2, 1)))
  w = 10_000.0 ** (-np.arange(F // 2) / (F // 2))
  angle = np.asarray(pos, np.float64)[..., None] * w
  np.testing.assert_allclose(out, np.concatenate([np.sin(angle), np.cos(angle)], -1), atol=2e-5)
  with pytest.raises(ValueError, match="even"):
    layers.sinusoidal(pos, 7)


def test_learned_positions_look_up_rows():
  module = layers.LearnedPositions(max_length=8, features=4)
  pos = jnp.array([[0, 1, 2, 0], [7, 6, 0, 1]])
  params = nn.unbox(module.init(KEY(0), pos)["params"])
  assert params["embedding"].shape == (8, 4)
  np.testing.assert_array_equal(module.apply({"params": params}, pos),
                                np.asarray(params["embedding"])[np.asarray(pos)])


# --------------------------------------------------------------------------------------
# T5 relative-position buckets


def t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """T5's bucket of memory_position - query_position, transcribed from mesh-tensorflow's
  `_relative_position_bucket` (the T5 paper's relative attention), one int at a time."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val_if_large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                                 * (num_buckets - max_exact))
  return ret + min(val_if_large, num_buckets - 1)


def test_t5_bucket_reference_on_known_values():
  """Sanity of the reference itself: T5's defaults (32 buckets, distance 128)."""
  f = functools.partial(t5_bucket, bidirectional=True, num_buckets=32, max_distance=128)
  assert [f(r) for r in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
  assert f(-8) == 8 and f(-128) == 15 and f(-10_000) == 15 and f(10_000) == 31
  g = functools.partial(t5_bucket, bidirectional=False, num_buckets=32, max_distance=128)
  assert [g(r) for r in (0, 5, 100, -1, -15, -16)] == [0, 0, 0, 1, 15, 16]
  assert g(-10_000) == 31


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20), (64, 256),
                                                      (10, 50), (32, 32)])
def test_relative_position_bucket_matches_t5(bidirectional, num_buckets, max_distance):
  rel = np.arange(-1000, 1001)
  got = layers.relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional=bidirectional,
                                        num_buckets=num_buckets, max_distance=max_distance)
  expected = [t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
  np.testing.assert_array_equal(got, expected)
  assert 0 <= int(got.min()) and int(got.max()) < num_buckets


def test_relative_position_bias_uses_buckets_of_key_minus_query():
  N, H, T, S, offset = 8, 3, 4, 6, 2
  module = layers.RelativePositionBias(N, 20, H, bidirectional=True)
  params = nn.unbox(module.init(KEY(0), T, S)["params"])
  bias = np.asarray(module.apply({"params": params}, T, S, offset))
  assert bias.shape == (1, H, T, S) and bias.dtype == np.float32
  table = np.asarray(params["embedding"])
  for t in range(T):
    for s in range(S):
      np.testing.assert_array_equal(bias[0, :, t, s],
                                    table[t5_bucket(s - (t + offset), True, N, 20)])
