"""How attention layers choose and use the kernel: fallbacks, `auto`, platform checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import kernels
from llmjax.kernels.flash_attention import BlockSizes
from llmjax.layers import attention


def _qkv(T=64, H=2, G=1, D=64):
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (2, T, H, D)), jax.random.normal(keys[1], (2, T, G, D)),
          jax.random.normal(keys[2], (2, T, G, D)))


def _args(T=64):
  seg = jnp.ones((2, T), jnp.int32)
  return dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True, scale=0.125)


@pytest.mark.parametrize("extra", ["prefix_mask", "dense_bias", "decoding"])
def test_what_the_kernel_lacks_falls_back_to_xla(extra, monkeypatch):
  """Each unsupported feature gives XLA's exact answer without calling the kernel."""
  q, k, v = _qkv()
  kwargs = _args()
  if extra == "prefix_mask":
    kwargs["prefix_mask"] = jnp.zeros((2, 64), jnp.int32).at[:, :10].set(1)
  elif extra == "dense_bias":
    kwargs["bias"] = jax.random.normal(jax.random.key(3), (1, 2, 64, 64))
  else:
    kwargs["q_offset"] = jnp.int32(3)
  expected = attention.xla_attention(q, k, v, **kwargs)
  monkeypatch.setattr(kernels, "flash_attention", lambda *a, **k: pytest.fail("kernel used"))
  np.testing.assert_array_equal(attention.pallas_attention(q, k, v, **kwargs), expected)


def test_pallas_uses_the_kernel_and_auto_does_not_on_cpu(monkeypatch):
  q, k, v = _qkv(T=128)
  calls = []
  real = kernels.flash_attention
  monkeypatch.setattr(kernels, "flash_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  expected = attention.xla_attention(q, k, v, **_args(128))
  np.testing.assert_allclose(attention.pallas_attention(q, k, v, **_args(128)), expected,
                             atol=2e-5)
  assert calls == [1]
  np.testing.assert_array_equal(attention.auto_attention(q, k, v, **_args(128)), expected)
  assert calls == [1]  # auto: XLA on CPU


def test_tpu_kv_blocks_must_be_lane_multiples_before_lowering():
  q, k, v = _qkv(T=256)
  with pytest.raises(ValueError, match="multiples of 128 on TPU"):
    kernels.flash_attention(q, k, v, block_sizes=BlockSizes(64, 64), interpret=False,
                            backend="tpu")
