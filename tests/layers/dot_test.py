"""llmjax.layers.dot: projections contract one dimension of rows, and 16-bit ones sum in
float32 forward and backward; anything else, and any intercepted call, is
jax.lax.dot_general; the residual gradient's store is the identity."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.layers import dot
from llmjax.models import common

DIMS = {1: (((2,), (0,)), ((), ())), 2: (((2, 3), (0, 1)), ((), ()))}  # Dense; Attention's out


def _operands(n, dtype):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(2, 5) + (3, 4)[:n] if n == 2 else (2, 5, 12))
  w = rng.normal(size=(3, 4, 6) if n == 2 else (12, 6))
  return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _loss(fn, x, w, n):
  return (fn(x, w, DIMS[n]).astype(jnp.float32) * jnp.arange(1.0, 13.0).reshape(2, 1, 6)).sum()


@pytest.mark.parametrize("n", [1, 2])
def test_bfloat16_products_sum_in_float32_forward_and_backward(n):
  """The forward is the float32 sum rounded once; the gradients agree with float32 autodiff
  to bfloat16's rounding; and every product of the gradient's program multiplies bfloat16
  operands into a float32 result (none upcasts an operand to float32)."""
  x, w = _operands(n, jnp.bfloat16)
  y = dot.dot_general(x, w, DIMS[n])
  expected = jax.lax.dot_general(x, w, DIMS[n], preferred_element_type=jnp.float32)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, expected.astype(jnp.bfloat16))
  grads = jax.grad(_loss, (1, 2))(dot.dot_general, x, w, n)
  f32 = lambda x, w, d: jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), d)
  for got, want in zip(grads, jax.grad(_loss, (1, 2))(f32, x, w, n)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
  program = jax.jit(jax.value_and_grad(_loss, (1, 2)), static_argnums=(0, 3)).lower(
      dot.dot_general, x, w, n).as_text()
  products = re.findall(r"stablehlo.dot_general .*: \((.*)\) -> (tensor<[^>]*>)", program)
  assert len(products) == 3, program
  for operands, result in products:
    assert operands.count("bf16") == 2 and result.endswith("xf32>"), (operands, result)


@pytest.mark.parametrize("n", [1, 2])
def test_projections_contract_one_row_dimension(n):
  """A float32 projection is jax.lax.dot_general's product, and every product of its gradient's
  program contracts at most one dimension of rows (x's leading dims flattened into one: two
  contracted, XLA:CPU copied the cotangent to a transposed layout)."""
  x, w = _operands(n, jnp.float32)
  np.testing.assert_allclose(dot.dot_general(x, w, DIMS[n]), jax.lax.dot_general(x, w, DIMS[n]),
                             rtol=1e-6, atol=1e-6)
  f32 = lambda x, w, d: jax.lax.dot_general(x, w, d)
  for got, want in zip(jax.grad(_loss, (1, 2))(dot.dot_general, x, w, n),
                       jax.grad(_loss, (1, 2))(f32, x, w, n)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  program = jax.jit(jax.value_and_grad(_loss, (1, 2)), static_argnums=(0, 3)).lower(
      dot.dot_general, x, w, n).as_text()
  products = re.findall(r"stablehlo.dot_general .*contracting_dims = \[([0-9, ]*)\] x", program)
  assert len(products) == 3, program
  # The forward contracts w's n dims, the input gradient w's one output dim, the weight
  # gradient the rows alone.
  assert sorted(len(p.split(",")) for p in products) == sorted([n, 1, 1]), products


def test_anything_else_is_jax_dot_general():
  """A batch dim or a contraction that is not a projection's: the very program
  jax.lax.dot_general gives."""
  x, w = _operands(1, jnp.float32)
  cases = [(x, x, (((1,), (1,)), ((), ()))), (x.astype(jnp.bfloat16), x.astype(jnp.bfloat16),
                                             (((2,), (2,)), ((0,), (0,))))]
  for a, b, dims in cases:
    ours = jax.jit(lambda a, b: dot.dot_general(a, b, dims)).lower(a, b).as_text()
    theirs = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims)).lower(a, b).as_text()
    assert ours == theirs


def test_an_intercepted_dot_general_is_called(monkeypatch):
  """While jax.lax.dot_general is replaced (qwix's LoRA, quantization), a 16-bit projection
  calls the replacement, so adapters and quantized weights are never bypassed."""
  calls = []
  original = jax.lax.dot_general

  def replacement(*args, **kwargs):
    calls.append(args[2])
    return original(*args, **kwargs)

  x, w = _operands(1, jnp.bfloat16)
  monkeypatch.setattr(jax.lax, "dot_general", replacement)
  assert dot.intercepted()
  dot.dot_general(x, w, DIMS[1])
  assert calls == [DIMS[1]]


def test_the_stored_gradient_is_the_gradient():
  """run_layers' store of the residual gradient passes every value through, NaN included."""
  g = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
  for g in (g, g.at[0, 0, 0].set(jnp.nan), g.at[1, 2, 3].set(-0.0)):
    _, vjp = jax.vjp(common._gradient_stored, jnp.zeros_like(g))
    np.testing.assert_array_equal(jax.jit(vjp)(g)[0], g)
