"""What fits a TPU's VMEM (llmjax/kernels/flash_attention/tpu.py): the VMEM model bounds what
Mosaic allocates, and blocks one step past the largest that fit are refused before
compiling. (targets_test.py compiles the largest that fit, with the scoped VMEM limit raised
where the model says so.)
"""

import jax
import jax.numpy as jnp
import pytest

from llmjax.kernels import flash_attention, targets
from llmjax.kernels.flash_attention import BlockSizes, tpu

MiB = 1 << 20
BF16, F32 = jnp.bfloat16, jnp.float32

# Scoped VMEM (MiB) Mosaic allocated, the least vmem_limit_bytes at which each kernel compiled
# (libtpu 0.0.42.1; kernel, target, bq, bk, D, dtype, T5 bias): the model must bound them.
MEASURED = [
    ("forward", "v5e", 1024, 1024, 128, BF16, False, 12.59),
    ("forward", "v5e", 2048, 1024, 128, BF16, False, 23.67),
    ("forward", "v5e", 1024, 512, 128, F32, False, 11.60),
    ("forward", "v5p", 512, 512, 256, F32, False, 10.77),
    ("forward", "v4", 1024, 512, 128, BF16, False, 9.19),
    ("dq", "v4", 512, 512, 128, BF16, True, 5.60),
    ("dq", "v5p", 512, 512, 128, BF16, True, 6.24),
    ("dq", "v5p", 512, 512, 256, F32, False, 12.77),
    ("dq", "v5e", 512, 512, 256, F32, True, 30.16),
    ("dq", "v5e", 512, 512, 128, F32, True, 25.25),
    ("dq", "v5e", 512, 512, 256, BF16, True, 17.94),
    ("dq", "v5e", 2048, 1024, 128, BF16, False, 11.93),
    ("dk/dv", "v4", 512, 512, 256, F32, False, 14.09),
    ("dk/dv", "v5e", 2048, 1024, 128, BF16, False, 14.69),
    ("dk/dv", "v5e", 512, 512, 256, F32, True, 12.64),
]


def largest(target, D, dtype, bias):
  """The largest square block (a multiple of 128) every kernel fits on `target`, or None."""
  fit = [b for b in range(128, 2049, 128)
         if all(tpu.vmem_need(k, b, b, D, dtype, bias) <= tpu.cap(target) for k in tpu.KERNELS)]
  return fit[-1] if fit else None


@pytest.mark.parametrize("case", MEASURED, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}x{c[3]}-D{c[4]}")
def test_the_model_bounds_what_mosaic_allocated(case):
  kernel, target, bq, bk, D, dtype, bias, mib = case
  need = tpu.vmem_need(kernel, bq, bk, D, dtype, bias)
  assert mib * MiB <= need <= 2 * mib * MiB + 2 * MiB, (need / MiB, mib)


def test_the_model_grows_with_the_blocks_and_the_head_dim():
  for kernel in tpu.KERNELS:
    for dtype, bias, D in [(BF16, False, 64), (BF16, True, 128), (F32, False, 256),
                           (F32, True, 128)]:
      grid = [[tpu.vmem_need(kernel, bq, bk, D, dtype, bias) for bk in range(128, 2049, 128)]
              for bq in range(8, 2049, 120)]
      assert all(a < b for row in grid for a, b in zip(row, row[1:])), (kernel, dtype, bias)
      assert all(a < b for col in zip(*grid) for a, b in zip(col, col[1:])), (kernel, dtype, bias)
      assert tpu.vmem_need(kernel, 512, 512, D, dtype, bias) <= tpu.vmem_need(
          kernel, 512, 512, 2 * D, dtype, bias)  # D 64 rows fill 128 lanes too
      assert tpu.vmem_need(kernel, 512, 512, D, BF16, bias) < tpu.vmem_need(
          kernel, 512, 512, D, F32, bias)


def test_the_limits_are_the_hardware_s():
  assert {t: tpu.cap(t) // MiB for t in targets.TPUS} == {"v4": 16, "v5e": 96, "v5p": 48,
                                                           "v6e": 96}
  assert tpu.cap(None) == tpu.cap("v4")  # unknown: what fits the smallest
  for target in targets.TPUS:  # the defaults fit, with room to grow
    for D, dtype, bias in [(64, BF16, False), (128, BF16, True), (256, F32, True)]:
      blocks = tpu.default_blocks(target, D, dtype, bias)
      assert blocks[0] >= 256 and max(blocks) <= 512, (target, D, dtype, bias, blocks)
      for kernel, bq, bk in zip(tpu.KERNELS, blocks[0::2], blocks[1::2]):
        assert tpu.vmem_need(kernel, bq, bk, D, dtype, bias) <= tpu.cap(target)


def _q(T, D, dtype):
  return jax.ShapeDtypeStruct((1, T, 2, D), dtype)


@pytest.mark.parametrize("target", [*targets.TPUS, None])
def test_one_block_past_the_largest_is_refused_before_compiling(target):
  """Refused in flash_attention's checks: eval_shape on CPU builds no kernel."""
  D, dtype, bias = 256, F32, True
  b = largest(target, D, dtype, bias)
  assert b is not None and b < 2048
  table = jax.ShapeDtypeStruct((32, 2), F32)

  def attend(blocks):
    return jax.eval_shape(lambda q, t: flash_attention(
        q, q, q, bias_table=t, causal=True, block_sizes=blocks, target=target),
        _q(4096, D, dtype), table)

  attend(BlockSizes(b, b))
  with pytest.raises(ValueError, match=rf"^BlockSizes block_q\w*={b + 128}, block_kv\w*="
                     rf"{b + 128}: the \S+ kernel would need [\d.]+ MiB of VMEM \(head dim 256, "
                     rf"float32, T5 bias\), over {target or 'the smallest TPU'}.* \d+ MiB; use "
                     rf"smaller blocks"):
    attend(BlockSizes(b + 128, b + 128))
  with pytest.raises(ValueError, match="^BlockSizes block_q_dq=2048, block_kv_dq=2048: the dq "):
    attend(BlockSizes(b, b, block_q_dq=2048, block_kv_dq=2048))
