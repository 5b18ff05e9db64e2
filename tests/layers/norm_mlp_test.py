"""Tests of llmjax.layers norm, mlp and embedding against numpy formulas."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import layers

KEY = functools.partial(jax.random.key, impl="rbg")  # compiles much faster than threefry on CPU
D, F = 8, 16


def _normal(seed, shape, scale=1.0, loc=0.0):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, size=shape), jnp.float32)


def _init_perturbed(module, *args):
  """Params of `module`, each moved off its init (so ones/zeros scales and biases count)."""
  params = nn.unbox(jax.jit(module.init)(KEY(0), *args)["params"])
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [p + _normal(10 + i, p.shape, 0.3) for i, p in enumerate(leaves)])


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, x):
  return module.apply({"params": params}, x)


# --------------------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_matches_numpy(use_bias):
  x = _normal(0, (2, 3, D), scale=3.0, loc=1.5)
  module = layers.LayerNorm(epsilon=1e-5, use_bias=use_bias)
  params = _init_perturbed(module, x)
  assert set(params) == ({"scale", "bias"} if use_bias else {"scale"})
  xn = np.asarray(x, np.float64)
  mean, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
  expected = (xn - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"])
  if use_bias:
    expected = expected + np.asarray(params["bias"])
  np.testing.assert_allclose(_apply(module, params, x), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_numpy():
  x = _normal(1, (2, 3, D), scale=3.0, loc=1.5)
  module = layers.RMSNorm(epsilon=1e-6)
  params = _init_perturbed(module, x)
  assert set(params) == {"scale"}
  xn = np.asarray(x, np.float64)
  expected = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(params["scale"])
  np.testing.assert_allclose(_apply(module, params, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", [layers.LayerNorm(dtype=jnp.bfloat16),
                                    layers.RMSNorm(dtype=jnp.bfloat16)], ids=["ln", "rms"])
def test_norms_compute_in_float32_and_return_dtype(module):
  """A bfloat16 model normalizes in float32 and rounds once at the end."""
  x = _normal(2, (2, 3, D), scale=100.0, loc=1000.0)  # large mean: bf16 variance would fail
  params = nn.unbox(module.init(KEY(0), x)["params"])
  assert params["scale"].dtype == jnp.float32
  f32 = module.clone(dtype=jnp.float32)
  out = _apply(module, params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), _apply(f32, params, x), atol=2e-2,
                             rtol=1e-2)


# --------------------------------------------------------------------------------------
# Mlp


def test_mlp_plain_and_gated_param_names():
  x = _normal(3, (2, 3, D))
  plain = nn.unbox(layers.Mlp(F).init(KEY(0), x)["params"])
  assert set(plain) == {"wi", "wo"}
  assert plain["wi"]["kernel"].shape == (D, F) and plain["wo"]["kernel"].shape == (F, D)
  gated = nn.unbox(layers.Mlp(F, "silu", gated=True).init(KEY(0), x)["params"])
  assert set(gated) == {"wi_0", "wi_1", "wo"}
  no_bias = nn.unbox(layers.Mlp(F, gated=True, use_bias=False).init(KEY(0), x)["params"])
  assert all(set(p) == {"kernel"} for p in no_bias.values())


def _gelu_erf(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


NUMPY_ACTIVATIONS = {"gelu": _gelu_erf, "gelu_tanh": _gelu_tanh,
                     "relu": lambda x: np.maximum(x, 0), "silu": lambda x: x / (1 + np.exp(-x))}


MLP_X = _normal(4, (2, 3, D), scale=2.0)


@functools.cache
def _mlp_params(gated):
  """Perturbed params of a (gated) Mlp; the activation does not change them."""
  return _init_perturbed(layers.Mlp(F, gated=gated), MLP_X)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", sorted(NUMPY_ACTIVATIONS))
def test_mlp_matches_numpy(act, gated):
  x = MLP_X
  module = layers.Mlp(F, act, gated=gated)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), _mlp_params(gated))
  dense = lambda name, h: h @ p[name]["kernel"] + p[name]["bias"]
  xn, a = np.asarray(x, np.float64), NUMPY_ACTIVATIONS[act]
  h = a(dense("wi_0", xn)) * dense("wi_1", xn) if gated else a(dense("wi", xn))
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)
  np.testing.assert_allclose(_apply(module, params, x), dense("wo", h), atol=1e-5, rtol=1e-5)


def test_gelu_exact_and_tanh_differ():
  """BERT's erf gelu and GPT-2's tanh gelu are different functions (same weights)."""
  x = _normal(5, (2, 3, D), scale=2.0)
  params = _mlp_params(False)
  exact = _apply(layers.Mlp(F, "gelu"), params, x)
  approx = _apply(layers.Mlp(F, "gelu_tanh"), params, x)
  diff = float(jnp.abs(exact - approx).max())
  assert 1e-5 < diff < 1e-1


def test_mlp_unknown_activation():
  with pytest.raises(ValueError, match="unknown activation 'swish'"):
    layers.Mlp(F, "swish").init(KEY(0), jnp.zeros((1, 2, D)))


# --------------------------------------------------------------------------------------
# Embed


def test_embed_lookup_and_attend():
  V = 11
  module = layers.Embed(V, D)
  ids = jnp.array([[0, 3, 10], [5, 5, 1]])
  params = _init_perturbed(module, ids)
  table = np.asarray(params["embedding"])
  assert table.shape == (V, D)
  np.testing.assert_array_equal(_apply(module, params, ids), table[np.asarray(ids)])
  x = _normal(6, (2, 3, D))
  logits = jax.jit(lambda p, x: module.apply({"params": p}, x, method="attend"))(params, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 3, V)
  np.testing.assert_allclose(logits, np.asarray(x, np.float64) @ table.T, atol=1e-5, rtol=1e-5)


def test_embed_dtypes_and_integer_ids():
  module = layers.Embed(11, D, dtype=jnp.bfloat16)
  ids = jnp.array([[1, 2]])
  params = nn.unbox(module.init(KEY(0), ids)["params"])
  assert params["embedding"].dtype == jnp.float32
  assert module.apply({"params": params}, ids).dtype == jnp.bfloat16
  attended = module.apply({"params": params}, jnp.ones((1, 2, D), jnp.bfloat16), method="attend")
  assert attended.dtype == jnp.float32
  with pytest.raises(ValueError, match="integer token ids"):
    module.apply({"params": params}, jnp.ones((1, 2), jnp.float32))
