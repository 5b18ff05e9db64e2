"""Tests of the GPU (Triton) flash-attention kernels, llmjax.kernels.flash_attention.gpu.

Without a GPU: the kernels run in the Pallas interpreter against the reference (outputs and
gradients, the cases of flash_attention_test.py), NaN-poisoned inputs show that invisible
blocks are skipped rather than masked (for the TPU kernels too), and jax.export lowers them
to Triton for CUDA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels.flash_attention import BlockSizes, flash_attention
from tests.kernels.flash_attention_test import KERNEL_CASES, _normal, check_kernel
from tests.kernels.lowering_test import TRITON, export, square_buffers

def _gpu_block(case) -> int:
  """The case's block as Triton takes it: the nearest power of two, fitting both lengths."""
  block = case.block or 128
  block = min(2 ** round(np.log2(block)), 2048)
  while block > min(case.T, case.S):
    block //= 2
  return block


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_gpu_kernel_matches_reference(case):
  check_kernel(case, _gpu_block(case), backend="gpu")


# Skipping, not masking: a NaN in a block the kernel computes and then masks still reaches
# the result (0 * NaN in p @ v, do @ v.T, p.T @ do), so finite results prove the blocks were
# never visited. T = S = 256 in blocks of 64. Per case: NaN in v at `nan_keys` leaves the
# output and dq finite at `clean_rows`; NaN in the cotangent at `nan_rows` leaves dk and dv
# finite at `clean_keys`.
SEG = jnp.asarray(np.repeat([[1, 2]], 128, axis=1), jnp.int32)
SKIP_CASES = {  # kwargs, nan_keys, clean_rows, nan_rows, clean_keys
    # kv block 1 lies past q block 0's diagonal, and q block 0 before kv blocks 1-3.
    "causal": (dict(causal=True), slice(64, 128), slice(0, 64), slice(0, 64), slice(64, 256)),
    # Segments 1 (0-127) and 2 (128-255), not causal: the loops span every block and only
    # the per-block segment ranges skip.
    "segments": (dict(segment_ids=SEG), slice(64, 128), slice(128, 256), slice(0, 64),
                 slice(128, 256)),
    # |i - j| < 16: q block 0 sees keys up to 78 (kv blocks 0-1), kv block 2 sees q blocks 1-3.
    "window": (dict(window=16), slice(128, 192), slice(0, 64), slice(0, 64), slice(128, 256)),
}


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("name", SKIP_CASES)
def test_kernels_skip_invisible_blocks(name, backend):
  kwargs, nan_keys, clean_rows, nan_rows, clean_keys = SKIP_CASES[name]
  q, k, v = (_normal(s, (1, 256, 2, 64)) for s in (1, 2, 3))

  def attend(q, k, v):
    return flash_attention(q, k, v, block_sizes=BlockSizes(64, 64), interpret=True,
                           backend=backend, **kwargs)

  @jax.jit
  def run(v, cotangent):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, *vjp(cotangent)

  out, dq, _, _ = run(v.at[:, nan_keys].set(jnp.nan), jnp.ones_like(q))
  assert np.isnan(np.asarray(out[:, nan_keys])).all()  # the poison reaches who sees it
  assert np.isfinite(np.asarray(out[:, clean_rows])).all()
  assert np.isfinite(np.asarray(dq[:, clean_rows])).all()
  _, _, dk, dv = run(v, jnp.ones_like(q).at[:, nan_rows].set(jnp.nan))
  assert np.isnan(np.asarray(dv[:, nan_rows])).all()
  assert np.isfinite(np.asarray(dk[:, clean_keys])).all()
  assert np.isfinite(np.asarray(dv[:, clean_keys])).all()


def test_gpu_rejects_blocks_that_are_not_powers_of_two():
  q = jnp.zeros((1, 192, 2, 64))
  with pytest.raises(ValueError, match="block_q=96 is not a power of two"):
    flash_attention(q, q, q, block_sizes=BlockSizes(96, 64), interpret=True, backend="gpu")


# Lowering for CUDA without a GPU: jax.export runs the Pallas -> Triton IR lowering (which
# catches unsupported primitives and non-power-of-two tensors) but no Triton compilation, so
# resource limits (shared memory, registers) are not checked here (targets_test.py compiles).
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("feature", ["segments", "t5_bias"])
def test_gpu_forward_and_gradient_lower_for_cuda(block, feature):
  forward, gradient = export(2048, block, feature, backend="gpu")
  assert forward.count(TRITON) == 1  # the forward kernel
  assert gradient.count(TRITON) == 3  # forward, dq, dk/dv
  assert "tpu_custom_call" not in forward + gradient


@pytest.mark.parametrize("feature", ["segments", "t5_bias"])
def test_gpu_no_sequence_by_sequence_buffer_at_4096(feature):
  """Outside the kernels, no tensor has two 4096-long dimensions."""
  for module in export(4096, 64, feature, backend="gpu"):
    assert not square_buffers(module, 4096)
