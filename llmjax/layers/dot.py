"""The projections' product: 16-bit operands multiply into float32 sums, forward and backward.

`jax.lax.dot_general` of two bfloat16 arrays returns bfloat16, and XLA:CPU runs that as a
float32 product (half the speed of its bfloat16 kernels, which sum in float32). Asking for a
float32 result fixes the forward, but the gradient's products then take the float32 cotangent
and upcast the other operand. Here all three products (forward, input and weight gradients)
take 16-bit operands and sum in float32, and each result is rounded once to 16 bits: the
numerics of a TPU's or GPU's bfloat16 matmul, at the CPU's bfloat16 speed.
"""

import functools

import jax
import jax.numpy as jnp

_DOT = jax.lax.dot_general
_CODE = _DOT.__code__


def intercepted() -> bool:
  """Whether jax.lax.dot_general is replaced now (qwix's LoRA and quantization do so)."""
  return jax.lax.dot_general is not _DOT or _DOT.__code__ is not _CODE


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _half(x, w, n: int, precision):
  """x [..., C] . w [C, O] over x's last n and w's first n dims, summed in float32."""
  dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
  return _DOT(x, w, dims, precision, preferred_element_type=jnp.float32).astype(x.dtype)


def _half_fwd(x, w, n, precision):
  return _half(x, w, n, precision), (x, w)


def _half_bwd(n, precision, res, g):
  x, w = res
  g, m = g.astype(x.dtype), x.ndim - n  # m: x's leading (not contracted) dims
  free = tuple(range(n, w.ndim))  # w's output dims, g's last ones
  dx = _DOT(g, w, ((tuple(range(m, g.ndim)), free), ((), ())), precision,
            preferred_element_type=jnp.float32)
  dw = _DOT(x, g, ((tuple(range(m)), tuple(range(m))), ((), ())), precision,
            preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_half.defvjp(_half_fwd, _half_bwd)


def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """jax.lax.dot_general; a product of two bfloat16 (or float16) arrays that contracts x's
  last dims with w's first (a projection: nn.Dense's, Attention's) sums in float32 forward
  and backward. Intercepted (LoRA, quantization), it is jax.lax.dot_general as given."""
  (cx, cw), batch = dimension_numbers
  n = len(cw)
  if (x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
      and preferred_element_type in (None, x.dtype) and batch == ((), ()) and not kw
      and tuple(cx) == tuple(range(x.ndim - n, x.ndim)) and tuple(cw) == tuple(range(n))
      and not intercepted()):
    return _half(x, w, n, precision)
  return jax.lax.dot_general(x, w, dimension_numbers, precision, preferred_element_type, **kw)
