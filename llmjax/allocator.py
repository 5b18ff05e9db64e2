"""glibc's allocator, set for XLA:CPU before anything is allocated in quantity.

XLA:CPU allocates a step's buffers afresh at every call. With glibc's defaults each thread
gets an arena of its own and freed memory goes back to the system, so every step faults its
buffers' pages in again: measured here, ~12 ms of a 45 ms shakespeare_char step (0.4-1.2M
page faults a run, 0.17M with the settings below), and 13.1k tokens/s instead of 11.3k.
`tune()` sets one arena and keeps 1 GiB at the top of the heap (mallopt M_ARENA_MAX, M_TOP_PAD)
on a machine without accelerators (TPU and GPU steps keep their buffers on the device).

Set after threads have allocated, the same settings do harm, so `python -m llmjax.main` calls
`tune()` first thing. MALLOC_ARENA_MAX or MALLOC_TOP_PAD_ in the environment (glibc's own
variables) win; LLMJAX_MALLOC=default leaves glibc as it is. A library user sets the glibc
variables (`ENVIRONMENT`) in the environment their process starts with.
"""

import ctypes
import glob
import os

_M_TOP_PAD, _M_ARENA_MAX = -2, -8
ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_TOP_PAD_": str(1 << 30)}  # the same, by glibc
ACCELERATORS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")  # TPU, TPU, GPU


def wanted(environ=os.environ, accelerators=ACCELERATORS) -> bool:
  """Whether to tune: JAX will run on this CPU and nobody chose the allocator's settings."""
  chosen = {"MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_"} & set(environ)
  platforms = environ.get("JAX_PLATFORMS", "")
  return (not chosen and environ.get("LLMJAX_MALLOC") != "default"
          and platforms in ("", "cpu")
          and (platforms == "cpu" or not any(glob.glob(p) for p in accelerators)))


def tune() -> bool:
  """One glibc arena and a 1 GiB top pad where `wanted()`; True if they were set."""
  if not wanted():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    return (bool(libc.mallopt(_M_ARENA_MAX, int(ENVIRONMENT["MALLOC_ARENA_MAX"])))
            & bool(libc.mallopt(_M_TOP_PAD, int(ENVIRONMENT["MALLOC_TOP_PAD_"]))))
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is left alone
    return False
