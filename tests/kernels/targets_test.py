"""The kernels compiled for real accelerators without them (llmjax/kernels/targets.py): Mosaic
to TPU code for v4 (megacore), v5e, v5p and v6e; the forward and the gradient, every head
dim and feature, bfloat16 and float32, at the default blocks. (The forward kernel is the one
the gradient's program runs first.)

Needs the `targets` extra (libtpu; part of the test extra). Without it the tests skip with a
warning that says so in the summary.
"""

import importlib.util
import itertools
import warnings

import jax
import jax.numpy as jnp
import pytest

from llmjax.kernels import flash_attention, targets
from llmjax.kernels.flash_attention.ops import HEAD_DIMS

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
if not HAVE_LIBTPU:
  warnings.warn("libtpu is not installed: the TPU compile tests are SKIPPED (pip install "
                "-e '.[targets]')")

B, T, H = 1, 256, 4
FEATURES = {  # name: (kv heads, what flash_attention is given)
    "plain": (H, {}),
    "causal_segments": (H, {"causal": True, "segment_ids": "segments"}),
    "t5_bias_causal": (H, {"causal": True, "bias_table": "table"}),
    "t5_bias_bidirectional": (H, {"bias_table": "table"}),
    "window": (H, {"causal": True, "window": 64}),
    "gqa": (H // 2, {"causal": True}),
}


def compile_attention(device, backend: str, D: int, dtype, feature: str, block_sizes=None):
  """The jitted gradient of the kernel, compiled for `device`: its program runs the forward
  kernel (with the statistics it saves), then the dq and dk/dv kernels."""
  G, kwargs = FEATURES[feature]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  extra = {"segments": sds((B, T), jnp.int32), "table": sds((32, H), jnp.float32)}
  names = [v for v in kwargs.values() if isinstance(v, str)]
  args = [sds((B, T, H, D), dtype), sds((B, T, G, D), dtype), sds((B, T, G, D), dtype),
          *(extra[n] for n in names)]

  def attend(q, k, v, *rest):
    given = dict(zip(names, rest))
    options = {k: given.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    return flash_attention(q, k, v, interpret=False, backend=backend,
                           block_sizes=block_sizes, **options)

  def loss(*args):
    return attend(*args).astype(jnp.float32).sum()

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed")
@pytest.mark.parametrize("target", list(targets.TPUS))
def test_every_feature_compiles_for_tpu_at_the_default_blocks(target):
  device = targets.devices(target)[0]
  failed = []
  for D, feature, dtype in itertools.product(HEAD_DIMS, FEATURES,
                                             (jnp.bfloat16, jnp.float32)):
    try:
      gradient = compile_attention(device, "tpu", D, dtype, feature)
    except Exception as e:  # noqa: BLE001 - every failure is collected and reported
      failed.append(f"D {D} {feature} {jnp.dtype(dtype).name}: {str(e).splitlines()[0]}")
      continue
    assert gradient.as_text().count("custom_call_target=\"tpu_custom_call\"") == 3, (D, feature)
  assert not failed, "\n".join(failed)


def test_targets_are_the_published_devices():
  """The GPU descriptions carry the vendor's figures that the kernels size blocks by."""
  assert targets.GPUS["a100"]["smem_per_block"] == 166_912  # 163 KiB opt-in per block
  assert targets.GPUS["h100"]["smem_per_block"] == 232_448  # 227 KiB
  config = targets.gpu_target_config("h100")
  assert "core_count: 132" in config and "major: 9 minor: 0" in config
  with pytest.raises(ValueError, match="unknown target 'v3'; expected one of v4, v5e"):
    targets.devices("v3")
