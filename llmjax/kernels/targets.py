"""Real accelerators as compile-only devices: programs compiled for them on a machine without.

    devices = targets.devices("v5e")  # 4 chips of a v5e 2x2 slice, from libtpu
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    jax.jit(f).lower(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)).compile()

runs the target's whole compiler: XLA and Mosaic to TPU code (the libtpu `jax[tpu]` pins),
or XLA, Triton and ptxas to GPU code (jax-cuda13-plugin and nvidia-cuda-nvcc, under
JAX_PLATFORMS=cpu so the plugin loads without CUDA's runtime libraries). A TPU target is a
topology libtpu knows; a GPU target, a description from the vendor's specifications (`GPUS`)."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import subprocess
import tempfile

import jax
from jax.experimental import topologies

TPUS = {  # name: (libtpu topology, options)
    "v4": ("v4:2x2x1", {"chip_config_name": "megacore"}),
    "v5e": ("v5e:2x2", {}),
    "v5p": ("v5p:2x2x1", {}),
    "v6e": ("v6e:2x2", {}),
}
VMEM = {"v4": 16 << 20, "v5e": 128 << 20, "v5p": 64 << 20, "v6e": 128 << 20}  # per core

GPUS = {  # name: published specifications (SXM parts)
    "a100": dict(kind="NVIDIA A100-SXM4-80GB", capability=(8, 0), sms=108, fpus_per_sm=64,
                 smem_per_sm=167_936, smem_per_block=166_912, l2=40 << 20,
                 bandwidth=2_039_000_000_000, clock_ghz=1.41, memory=80 << 30),
    "h100": dict(kind="NVIDIA H100 80GB HBM3", capability=(9, 0), sms=132, fpus_per_sm=128,
                 smem_per_sm=233_472, smem_per_block=232_448, l2=50 << 20,
                 bandwidth=3_352_320_000_000, clock_ghz=1.98, memory=80 << 30),
}

NAMES = (*TPUS, *GPUS)
KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
         "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e", "NVIDIA A100": "a100",
         "NVIDIA H100": "h100", "NVIDIA H200": "h100", "NVIDIA GH200": "h100"}  # device kinds


def name_of(device) -> str | None:
  """The target a device is (or is sized like: an H200 has an H100's SMs), or None."""
  kind = device.device_kind
  return KINDS.get(kind) or next((name for prefix, name in KINDS.items()
                                  if kind.startswith((prefix + " ", prefix + "-"))), None)


def local() -> str | None:
  """The target of this machine's first accelerator; None on CPU or an unknown device."""
  return name_of(jax.devices()[0]) if jax.default_backend() in ("tpu", "gpu") else None


def gpu_target_config(name: str) -> str:
  """XLA's GpuTargetConfig (text proto) of GPU `name`."""
  g = GPUS[name]
  major, minor = g["capability"]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {g["smem_per_sm"]} shared_memory_per_block_optin: {g["smem_per_block"]}
  threads_per_core_limit: 2048 core_count: {g["sms"]} fpus_per_core: {g["fpus_per_sm"]}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {g["bandwidth"]} l2_cache_size: {g["l2"]} clock_rate_ghz: {g["clock_ghz"]}
  device_memory_size: {g["memory"]} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{g["kind"]}"
"""


@functools.cache
def devices(name: str) -> tuple:
  """The compile-only devices of target `name` (one of NAMES)."""
  if name in TPUS:
    # Compiling needs no chip: let libtpu load beside another process that compiles too.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology, options = TPUS[name]
    return tuple(topologies.get_topology_desc(topology, platform="tpu", **options).devices)
  if name in GPUS:
    try:
      return tuple(topologies.get_topology_desc(
          platform="cuda", topology_name=name, target_config=gpu_target_config(name),
          topology="1x1x1").devices)
    except NotImplementedError:  # the plugin is missing, or failed its check of CUDA's libraries
      raise RuntimeError(f"no CUDA compiler for target {name!r}: install the `targets` extra and "
                         f"run with JAX_PLATFORMS=cpu (then jax's CUDA plugin loads without "
                         f"CUDA's runtime libraries, which compiling does not need)") from None
  raise ValueError(f"unknown target {name!r}; expected one of {', '.join(NAMES)}")


def ptxas() -> str | None:
  """The ptxas of the nvidia-cuda-nvcc package (what XLA compiles GPU code with), or None."""
  spec = importlib.util.find_spec("nvidia")
  for root in spec.submodule_search_locations if spec else ():
    for path in glob.glob(os.path.join(root, "cu*", "bin", "ptxas")):
      return path
  return None


def gpu_kernels(lowered, name: str, prefix: str = "flash_attention") -> dict[str, dict]:
  """Compiles `lowered` for GPU target `name`; per kernel named `prefix`...: {"smem": bytes
  of shared memory (XLA's launch), "registers" and "spill_stores" (bytes; `ptxas -v`),
  "async_copies" (cp.async in its PTX: the loads software pipelining issues)}."""
  major, minor = GPUS[name]["capability"]
  arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
  kernels = {}
  with tempfile.TemporaryDirectory() as dump:
    # At XLA's default optimization level, whatever XLA_FLAGS say: what a GPU job compiles.
    lowered.compile(compiler_options={"xla_dump_to": dump, "xla_backend_optimization_level": 3})
    thunks = "".join(open(f).read() for f in glob.glob(f"{dump}/*thunk_sequence.txt"))
    for path in glob.glob(f"{dump}/*.ptx"):
      ptx = open(path).read()
      entry = re.search(rf"\.entry ({prefix}\w*)", ptx)
      if not entry:
        continue
      kernel = entry.group(1)
      info = subprocess.run([ptxas(), "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
      spills = re.search(r"(\d+) bytes spill stores", info)
      kernels[kernel] = dict(
          smem=int(re.search(rf"{kernel} .*shared_memory: (\d+)", thunks).group(1)),
          registers=int(re.search(r"Used (\d+) registers", info).group(1)),
          spill_stores=int(spills.group(1)) if spills else 0,
          async_copies=ptx.count("cp.async."))
  return kernels
