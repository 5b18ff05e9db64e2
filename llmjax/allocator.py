"""glibc's allocator, set for XLA:CPU before anything is allocated in quantity.

XLA:CPU allocates a step's buffers afresh at every call. With glibc's defaults each thread
gets an arena of its own and freed memory goes back to the system, so steps fault their
buffers' pages in again, measured here:
- shakespeare_char: ~12 ms of a 45 ms step (0.4-1.2M page faults a run, 0.17M with the
  settings below), 13.1k tokens/s instead of 11.3k;
- a block over glibc's mmap threshold (at most 32 MiB, however it adapts) is mapped afresh at
  each allocation: a BERT's embedding gradient (30522 x 384 float32, 47 MB) took 27 ms a step
  to create, and a MiniLM fine-tuning step 742 ms instead of 636;
- with the mmap threshold set, glibc gives the heap's top back down to the top pad whenever
  over 128 KiB of it is free: in that fine-tune, every ~20 steps 142k pages (560 MB) were faulted in
  again, a 1.9 s step (0.66 s otherwise).
`tune()` sets one arena, keeps 1 GiB at the top of the heap, maps only blocks over 1 GiB and
trims only when over 2 GiB of the top is free, the most mallopt's int takes (mallopt
M_ARENA_MAX, M_TOP_PAD, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) on a machine without accelerators
(TPU and GPU steps keep their buffers on the device). `ENVIRONMENT` never trims (glibc reads
sizes from the environment): with a 2 GiB threshold the fine-tune above still re-faulted every
~15 steps, with none it never did. The process keeps the memory it once used, as a training
process does anyway.

Set after threads have allocated, the same settings do harm, so `python -m llmjax.main` calls
`tune()` first thing. Any of glibc's variables in `ENVIRONMENT` set in the environment wins;
LLMJAX_MALLOC=default leaves glibc as it is. A library user sets `ENVIRONMENT` in the
environment their process starts with.
"""

import ctypes
import glob
import os

_MALLOPT = {"MALLOC_ARENA_MAX": (-8, 1), "MALLOC_TOP_PAD_": (-2, 1 << 30),
            "MALLOC_MMAP_THRESHOLD_": (-3, 1 << 30), "MALLOC_TRIM_THRESHOLD_": (-1, 2**31 - 1)}
# The same by glibc's variables, which take any size: no trimming at all.
ENVIRONMENT = {name: str(value) for name, (_, value) in _MALLOPT.items()}
ENVIRONMENT["MALLOC_TRIM_THRESHOLD_"] = str(1 << 62)
ACCELERATORS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")  # TPU, TPU, GPU


def wanted(environ=os.environ, accelerators=ACCELERATORS) -> bool:
  """Whether to tune: JAX will run on this CPU and nobody chose the allocator's settings."""
  chosen = set(ENVIRONMENT) & set(environ)
  platforms = environ.get("JAX_PLATFORMS", "")
  return (not chosen and environ.get("LLMJAX_MALLOC") != "default"
          and platforms in ("", "cpu")
          and (platforms == "cpu" or not any(glob.glob(p) for p in accelerators)))


def tune() -> bool:
  """`ENVIRONMENT`'s settings, made by mallopt where `wanted()`; True if all were taken."""
  if not wanted():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    return all([bool(libc.mallopt(option, value)) for option, value in _MALLOPT.values()])
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is left alone
    return False
