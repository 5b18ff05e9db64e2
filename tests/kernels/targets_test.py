"""The kernels compiled for real accelerators without them (llmjax/kernels/targets.py): Mosaic
to TPU code for v4 (megacore), v5e, v5p and v6e, Triton and ptxas to GPU code for A100 and
H100; the forward and the gradient over head dims, features and dtypes at the default
blocks (`matrix`: every pair of them on one of each two targets of a kind) and at the
largest blocks accepted (`largest_matrix`), the refusal of larger ones, ptxas's figures at
the defaults, and whole sharded train steps. (The forward kernel is the one the gradient's
program runs first.) LLMJAX_TARGET_MATRIX=full compiles the whole product for every target
both ways (17 CPU-minutes at the default blocks alone).

Needs the `targets` extra (libtpu, the CUDA plugin and ptxas; part of the test extra).
Without it the tests skip with a warning that says so in the summary.
"""

import functools
import importlib.util
import itertools
import os
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn

from llmjax import data, models, objectives
from llmjax import sharding as sh
from llmjax.kernels import flash_attention, targets
from llmjax.kernels.flash_attention import BlockSizes
from llmjax.train import step
from llmjax.kernels.flash_attention.ops import HEAD_DIMS

# An executable compiled for a device this machine lacks goes to the tests' persistent
# compilation cache but cannot be loaded back from it (no client): a second compile of the
# same program warns and compiles again.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAVE_CUDA = importlib.util.find_spec("jax_plugins.xla_cuda13") is not None and bool(
    targets.ptxas())
for have, what in ((HAVE_LIBTPU, "libtpu is not installed: the TPU"),
                   (HAVE_CUDA, "the CUDA plugin or ptxas is not installed: the GPU")):
  if not have:
    warnings.warn(f"{what} compile tests are SKIPPED (pip install -e '.[targets]')")

B, T, H = 1, 256, 4
FEATURES = {  # name: (kv heads, what flash_attention is given)
    "plain": (H, {}),
    "causal_segments": (H, {"causal": True, "segment_ids": "segments"}),
    "t5_bias_causal": (H, {"causal": True, "bias_table": "table"}),
    "t5_bias_bidirectional": (H, {"bias_table": "table"}),
    "window": (H, {"causal": True, "window": 64}),
    "gqa": (H // 2, {"causal": True}),
}


# Targets compiled as pairs at the default blocks: each compiles half of the configurations
# below, the pair all of them (A100, the slowest to compile for, the smaller half).
PAIRS = (("v4", "v5e"), ("v5p", "v6e"), ("h100", "a100"))


def matrix(target: str):
  """The (head dim, feature, dtype) configurations compiled for `target` at the default blocks:
  each pair of head dim, feature and dtype at least once per pair of targets (`PAIRS`: 18 of
  the 36 combinations, split so that each target compiles every head dim, feature and dtype;
  compiling for a GPU takes 2-30 s per gradient program on 2 cores), or all 36 for every
  target with LLMJAX_TARGET_MATRIX=full."""
  full = os.environ.get("LLMJAX_TARGET_MATRIX") == "full"
  half = next(pair.index(target) for pair in PAIRS if target in pair)
  for (i, D), (j, feature) in itertools.product(enumerate(HEAD_DIMS), enumerate(FEATURES)):
    for k, dtype in enumerate((jnp.bfloat16, jnp.float32)):
      if full or ((i + j) % 2 == k and (i + j // 2) % 2 == half):
        yield D, feature, dtype


def compile_attention(device, backend: str, D: int, dtype, feature: str, block_sizes=None,
                      lower_only: bool = False, precision: str = "default", T: int = T):
  """The jitted gradient of the kernel at length T, compiled for `device` (or only lowered):
  its program runs the forward kernel (with the statistics it saves), then the dq and dk/dv
  kernels. `precision`: jax_default_matmul_precision ("default": float32 in TF32 on GPU, as
  users get it; the test session's is "highest")."""
  G, kwargs = FEATURES[feature]
  target = targets.name_of(device)
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
    return flash_attention(q, k, v, interpret=False, backend=backend, target=target,
                           block_sizes=block_sizes, **options)

  def loss(*args):
    return attend(*args).astype(jnp.float32).sum()

  with jax.default_matmul_precision(precision):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args)
  return lowered if lower_only else lowered.compile()


def largest(target: str, D: int, dtype, feature: str) -> int:
  """The largest square blocks `BlockSizes` accepts for the configuration on `target` (TPU:
  multiples of 128 up to 2048; GPU: powers of two up to 128), by flash_attention's own
  checks: each refusal comes before anything is lowered."""
  device, backend = targets.devices(target)[0], "tpu" if target in targets.TPUS else "gpu"
  for b in range(2048, 127, -128) if backend == "tpu" else (128, 64, 32, 16):
    try:
      compile_attention(device, backend, D, dtype, feature, BlockSizes(b, b), lower_only=True,
                        T=b)
      return b
    except ValueError as e:
      assert str(e).startswith("BlockSizes"), e
  raise AssertionError(f"{target} accepts no blocks for D {D} {feature} {dtype}")


def largest_matrix(target: str):
  """The configurations compiled at their largest blocks: all 36 with
  LLMJAX_TARGET_MATRIX=full; else bfloat16 causal + segments at D 128 on TPU (float32 T5 bias
  at D 64 too on v4, whose VMEM binds first: elsewhere the dq kernel's per-bucket selects at
  blocks of 1024 and more take minutes to compile), GQA at D 128 and a float32 window at D 256
  on GPU."""
  if os.environ.get("LLMJAX_TARGET_MATRIX") == "full":
    return list(matrix(target))
  if target in targets.GPUS:
    return [(128, "gqa", jnp.bfloat16), (256, "window", jnp.float32)]
  return [(128, "causal_segments", jnp.bfloat16)] + [(64, "t5_bias_causal", jnp.float32)] * (
      target == "v4")



def _need_compiler(target: str):
  if not (HAVE_LIBTPU if target in targets.TPUS else HAVE_CUDA):
    pytest.skip(f"no compiler for {target} is installed")


@pytest.mark.parametrize("blocks", ["default", "largest"])
@pytest.mark.parametrize("target", targets.NAMES)
def test_every_feature_compiles(target, blocks):
  """Forward and gradient compile for the target over `matrix` at the default blocks, and
  over `largest_matrix` at the largest square blocks accepted (with the sequence that long)."""
  _need_compiler(target)
  device, backend = targets.devices(target)[0], "tpu" if target in targets.TPUS else "gpu"
  failed = []
  for D, feature, dtype in matrix(target) if blocks == "default" else largest_matrix(target):
    b = largest(target, D, dtype, feature) if blocks == "largest" else None
    try:
      program = compile_attention(device, backend, D, dtype, feature, b and BlockSizes(b, b),
                                  T=b or T).as_text()
    except Exception as e:  # noqa: BLE001 - every failure is collected and reported
      failed.append(f"D {D} {feature} {jnp.dtype(dtype).name} blocks {b or 'default'}: "
                    f"{str(e).splitlines()[0]}")
      continue
    assert all(f"flash_attention_{kernel}" in program for kernel in ("fwd", "dq", "dkv"))
  assert not failed, "\n".join(failed)


@pytest.mark.skipif(not HAVE_CUDA, reason="the CUDA plugin or ptxas is not installed")
@pytest.mark.parametrize("target", list(targets.GPUS))
def test_default_gpu_kernels_keep_registers_and_pipeline_their_loads(target):
  """ptxas spills nothing in the forward, dq and dk/dv kernels at the defaults (D 64 and 128,
  bfloat16, causal with packed segments), and the loops' loads are asynchronous copies."""
  for D in (64, 128):
    lowered = compile_attention(targets.devices(target)[0], "gpu", D, jnp.bfloat16,
                                "causal_segments", lower_only=True)
    kernels = targets.gpu_kernels(lowered, target)
    assert sorted(kernels) == ["flash_attention_dkv_gpu", "flash_attention_dq_gpu",
                               "flash_attention_fwd_gpu"]
    for name, used in kernels.items():
      assert used["spill_stores"] == 0, (D, name, used)
      assert used["async_copies"] > 0, (D, name, used)
      assert used["smem"] <= targets.GPUS[target]["smem_per_block"], (D, name, used)


@pytest.mark.skipif(not HAVE_CUDA, reason="the CUDA plugin or ptxas is not installed")
@pytest.mark.parametrize("target", list(targets.GPUS))
def test_gpu_refuses_blocks_that_do_not_fit(target):
  device = targets.devices(target)[0]

  def lower(D, dtype, feature, block):
    return compile_attention(device, "gpu", D, dtype, feature, BlockSizes(block, block),
                             lower_only=True)

  with pytest.raises(ValueError, match="block_q=256 x block_kv=256: a 65536-logit tile is more "
                                       "than the 32768 a GPU's registers hold"):
    lower(64, jnp.bfloat16, "plain", 256)
  with pytest.raises(ValueError, match=rf"block_q=128 x block_kv=128 at head dim 256 float32: "
                                       rf"the fwd kernel needs \d+ bytes of shared memory, "
                                       rf"more than {target}'s"):
    lower(256, jnp.float32, "plain", 128)
  assert largest(target, 128, jnp.bfloat16, "gqa") == 128
  assert largest(target, 256, jnp.float32, "plain") < 128
  # float32 at full precision (Triton's IEEE dot stages more in shared memory) at the defaults
  compile_attention(device, "gpu", 64, jnp.float32, "causal_segments", precision="highest")


def test_targets_are_the_published_devices():
  """The GPU descriptions carry the vendor's figures that the kernels size blocks by."""
  assert targets.GPUS["a100"]["smem_per_block"] == 166_912  # 163 KiB opt-in per block
  assert targets.GPUS["h100"]["smem_per_block"] == 232_448  # 227 KiB
  config = targets.gpu_target_config("h100")
  assert "core_count: 132" in config and "major: 9 minor: 0" in config
  with pytest.raises(ValueError, match="unknown target 'v3'; expected one of v4, v5e"):
    targets.devices("v3")


@pytest.mark.skipif(not (HAVE_LIBTPU and HAVE_CUDA), reason="libtpu or the CUDA plugin missing")
def test_each_target_is_known_by_its_devices_kind():
  for name in targets.NAMES:
    assert targets.name_of(targets.devices(name)[0]) == name


@pytest.mark.parametrize("family", ["gpt", "t5"])
@pytest.mark.parametrize("target", ["v5e", "h100"])
def test_sharded_train_step_with_the_kernel_compiles_for_the_target(target, family):
  """The whole train step of a model with attention_impl="pallas" on a mesh of the target's
  devices (v5e 2x2: data 2 x tensor 2; one H100): the kernels the layers pick from the mesh
  are the target's, compiled."""
  _need_compiler(target)
  devices = targets.devices(target)
  mesh = sh.make_mesh((len(devices) // 2, 1, 2) if len(devices) > 1 else (1, 1, 1),
                      devices=devices)
  tokenizer = data.ByteTokenizer()
  sizes = dict(vocab_size=tokenizer.vocab_size, num_layers=1, num_heads=2, d_model=256,
               attention_impl="pallas")
  if family == "gpt":
    model = models.GPT(models.GPTConfig.from_size("tiny", max_seq_len=256, **sizes))
    objective = objectives.CausalLM(tokenizer, 256)
  else:
    model = models.T5(models.T5Config.from_size("tiny", head_dim=128, **sizes))
    objective = objectives.SpanCorruption(tokenizer, inputs_length=256)
  parts = step.Parts(model, objective, optax.adamw(1e-3), mesh)
  state, state_shardings, _ = step.init_state(parts, jax.random.key(0))
  batch = data.padding_batch(objective, 4)
  batch_shardings = step.batch_shardings(parts, batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
           for k, v in batch.items()}
  train_step = jax.jit(functools.partial(step.train_step, parts),
                       in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None))
  with (jax.set_mesh(mesh), nn.logical_axis_rules(parts.rules),
        jax.default_matmul_precision("default")):  # float32 in TF32 on GPU, as users get it
    program = train_step.lower(state, batch).compile().as_text()
  attentions = 1 if family == "gpt" else 3  # T5: encoder, decoder and cross attention
  for kernel in ("fwd", "dq", "dkv"):
    assert program.count(f"flash_attention_{kernel}") >= attentions, kernel
