"""The kernels lower for TPU (Mosaic) without a TPU, and nothing T x S is materialized."""

import re

import jax
import jax.numpy as jnp
import pytest

from llmjax.kernels import flash_attention
from llmjax.kernels.flash_attention import BlockSizes

B, H, G, D = 1, 4, 2, 128


TRITON = "__gpu$xla.gpu.triton"  # the custom call jax.export must be told to accept


def export(T: int, block: int, feature: str, backend: str = "tpu"):
  """jax.export of the jitted forward and of its gradient, bfloat16, for the backend's
  platform ("tpu": Mosaic kernels; "gpu": Triton kernels for CUDA)."""
  sds = jax.ShapeDtypeStruct
  extra = sds((B, T), jnp.int32) if feature == "segments" else sds((32, H), jnp.float32)

  def attend(q, k, v, x):
    kwargs = ({"causal": True, "segment_ids": x} if feature == "segments"
              else {"bias_table": x, "bias_bidirectional": True})
    return flash_attention(q, k, v, block_sizes=BlockSizes(block, block), interpret=False,
                           backend=backend, **kwargs)

  def loss(q, k, v, x):
    return attend(q, k, v, x).astype(jnp.float32).sum()

  argnums = (0, 1, 2) if feature == "segments" else (0, 1, 2, 3)
  args = (sds((B, T, H, D), jnp.bfloat16), sds((B, T, G, D), jnp.bfloat16),
          sds((B, T, G, D), jnp.bfloat16), extra)
  options = ({"platforms": ["tpu"]} if backend == "tpu" else
             {"platforms": ["cuda"],
              "disabled_checks": [jax.export.DisabledSafetyCheck.custom_call(TRITON)]})
  forward = jax.export.export(jax.jit(attend), **options)(*args)
  gradient = jax.export.export(jax.jit(jax.grad(loss, argnums=argnums)), **options)(*args)
  return forward.mlir_module(), gradient.mlir_module()


def square_buffers(module: str, T: int) -> list[str]:
  """Tensor types of `module` with two T-long dimensions."""
  shapes = re.findall(r"tensor<([0-9x]+)x(?:bf16|f32|i32|i1|f16)>", module)
  assert shapes, "no tensor types found: the check would be vacuous"
  return [s for s in shapes if s.split("x").count(str(T)) >= 2]


@pytest.mark.parametrize("block", [128, 512])
@pytest.mark.parametrize("feature", ["segments", "t5_bias"])
def test_forward_and_gradient_lower_for_tpu(block, feature):
  forward, gradient = export(2048, block, feature)
  assert forward.count("tpu_custom_call") == 1  # the forward kernel
  assert gradient.count("tpu_custom_call") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("feature", ["segments", "t5_bias"])
def test_no_sequence_by_sequence_buffer_at_4096(feature):
  """Outside the kernels (whose blocks are small), no tensor has two 4096-long dimensions."""
  for module in export(4096, 512, feature):
    assert not square_buffers(module, 4096)
