"""Metrics: `metrics.jsonl` and TensorBoard event files in the workdir, and MFU.

MFU convention (PaLM, appendix B): a trained token costs 6 * N FLOPs for the N non-embedding
parameters it touches, plus 6 * L * T * D for attention scores and values (L layers, T
context, D model width), forward and backward. MFU divides what the steps achieved by the
peak of the devices: a table of bf16 peaks per accelerator kind, or on CPU a float32 matmul
measured once at startup.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# bf16 dense peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def measured_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of an n x n float32 matmul on the default device: the best of `repeats`."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of all devices, where the figure came from)."""
  device = jax.devices()[0]
  kind = device.device_kind
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops * jax.device_count(), f"{kind} data sheet (bf16)"
  if device.platform == "cpu":
    return measured_cpu_flops(), "measured f32 matmul on this CPU"
  return float("nan"), f"unknown device kind {kind!r}: MFU not reported"


def flops_per_token(num_params: int, embed_params: int, num_layers: int, context: int,
                    d_model: int) -> float:
  """Training FLOPs per token under the convention in the module docstring."""
  return 6.0 * (num_params - embed_params) + 6.0 * num_layers * context * d_model


class MetricWriter:
  """Appends `{"step": s, key: value, ...}` lines to workdir/metrics.jsonl and TensorBoard scalars.

  Only process 0 writes. TensorBoard files come from tensorboardX (no TensorFlow); without
  it installed only the JSON lines are written.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    torn = os.path.isfile(path) and os.path.getsize(path) and not _ends_with_newline(path)
    self._jsonl = open(path, "a")
    if torn:  # a run killed mid-line: end that line so the next record stands alone
      self._jsonl.write("\n")
    self._tb = _tensorboard_writer(workdir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if np.isfinite(value):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _tensorboard_writer(workdir: str):
  """tensorboardX's SummaryWriter for workdir, or None without tensorboardX. tensorboardX
  imports torch where it is installed, only to accept torch tensors (we pass floats): hidden
  from that import, torch's 2-3 s of import time stays out of every run's start."""
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  finally:
    if hide_torch:
      del sys.modules["torch"]
  return SummaryWriter(workdir, flush_secs=30)


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl, in order. A run resumed after a kill logs the
  steps after its checkpoint again (with the same values); a line torn by the kill is skipped."""
  records = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
