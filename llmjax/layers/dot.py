"""The projections' product: rows flattened into one dimension; 16-bit operands multiply into
float32 sums, forward and backward.

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


def _projection(ndim: int, n: int):
  """The dimension numbers of x (ndim dims) . w over x's last n and w's first n dims."""
  return (tuple(range(ndim - n, ndim)), tuple(range(n))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _half(x, w, n: int, precision):
  """x [..., C] . w [C, O] over x's last n and w's first n dims, summed in float32."""
  return _DOT(x, w, _projection(x.ndim, n), precision,
              preferred_element_type=jnp.float32).astype(x.dtype)


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
  """jax.lax.dot_general, for projections (x's last dims contracted with w's first). Two
  bfloat16 (or float16) operands sum in float32 forward and backward. Any other projection
  runs on x's leading dims flattened into one, so its weight gradient contracts a single
  dimension: contracting two, XLA:CPU copies the cotangent into a transposed layout with the
  elementwise ops before it fused in, a cache miss per element (a fifth of a small GPT's step).
  Intercepted (LoRA, quantization), it is jax.lax.dot_general as given."""
  (cx, cw), batch = dimension_numbers
  n, m = len(cw), x.ndim - len(cw)  # m: x's leading (not contracted) dims
  if kw or ((tuple(cx), tuple(cw)), batch) != _projection(x.ndim, n) or intercepted():
    return jax.lax.dot_general(x, w, dimension_numbers, precision, preferred_element_type, **kw)
  if (x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
      and preferred_element_type in (None, x.dtype)):
    return _half(x, w, n, precision)
  y = jax.lax.dot_general(x.reshape(-1, *x.shape[m:]), w, _projection(n + 1, n), precision,
                          preferred_element_type)
  return y.reshape(*x.shape[:m], *y.shape[1:])
