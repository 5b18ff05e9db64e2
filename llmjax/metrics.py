"""Metrics: `metrics.jsonl` and TensorBoard event files in the workdir, and MFU.

MFU convention (PaLM, appendix B): a trained token costs 6 * N FLOPs for the N non-embedding
parameters it touches, plus 6 * L * T * D for attention scores and values (L layers, T context, D
model width), forward and backward. MFU divides what the steps achieved by `peak_flops`."""

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import timeit

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from llmjax import paths

# bf16 dense peak FLOP/s per chip (vendors' data sheets) by `device.device_kind` (v5e reports
# "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"); the longest matching prefix wins.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA A100": 312e12,
              "NVIDIA H100 PCIe": 756e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}
# LLMJAX_PEAK_CACHE moves it (the tests keep theirs apart: a peak measured while a test
# suite loads the cores would understate this machine's for every later run).
PEAK_CACHE = os.environ.get("LLMJAX_PEAK_CACHE", "~/.cache/llmjax/cpu_peak_flops.json")


def measured_cpu_flops(n: int = 1024, repeats: int = 20, dtype: str = "float32") -> float:
  """FLOP/s of an n x n matmul of `dtype` operands summed in float32 (the product a model
  computing in `dtype` runs) on the default device: the best of `repeats`."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: jax.lax.dot(x, x, preferred_element_type=jnp.float32))
  matmul(a).block_until_ready()
  times = timeit.repeat(lambda: matmul(a).block_until_ready(), number=1, repeat=repeats)
  return 2 * n**3 / min(times)


def _cached_cpu_peak(dtype: str) -> tuple[float, str]:
  """This CPU's `dtype` matmul FLOP/s, measured once per CPU model, core count and dtype
  (PEAK_CACHE)."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    names = []
  key = f"{names[0] if names else platform.processor() or platform.machine()} x{os.cpu_count()}"
  key += "" if dtype == "float32" else f" {dtype}"
  cache = os.path.expanduser(PEAK_CACHE)
  try:
    with open(cache) as f:
      table = json.load(f)
  except (OSError, ValueError):
    table = {}
  what = "f32" if dtype == "float32" else dtype
  if not isinstance(table.get(key), (int, float)):
    table[key] = measured_cpu_flops(dtype=dtype)
    try:
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      with open(cache + ".tmp", "w") as f:
        json.dump(table, f, indent=1)
      os.replace(cache + ".tmp", cache)
    except OSError:
      return table[key], f"{what} matmul measured now on this CPU ({key}); {cache} not writable"
  return float(table[key]), f"{what} matmul measured once on this CPU, cached in {cache}"


def peak_flops(configured: float | None = None, dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of all devices, where the figure came from): `configured` if given, else
  the device kind's data sheet, else (CPU) a cached measurement at the compute `dtype`."""
  if configured:
    return float(configured), "configured: train.peak_flops"
  device = jax.devices()[0]
  kind = device.device_kind
  name = max((n for n in PEAK_FLOPS if kind.startswith(n)), key=len, default=None)
  if name is not None:
    return PEAK_FLOPS[name] * jax.device_count(), f"{kind} data sheet, bf16"
  if device.platform == "cpu":
    return _cached_cpu_peak(str(jnp.dtype(dtype)))
  return float("nan"), f"unknown device kind {kind!r}: MFU not reported"


def flops_per_token(num_params: int, embed_params: int, num_layers: int, context: int,
                    d_model: int) -> float:
  """Training FLOPs per token under the convention in the module docstring."""
  return 6.0 * (num_params - embed_params) + 6.0 * num_layers * context * d_model


class StepMetrics:
  """The train/* record of the steps since the last log line.

  `add(step, metrics)` takes a step's device metrics and fetches (and checks finite) the
  previous step's, so the host runs at most one step ahead. A step's time is the wall time
  between `add`s less `excluded()` time; the first `warmup` steps (the compile) are untimed."""

  def __init__(self, flops_per_token: float, peak: float, warmup: int = 2,
               window: dict | None = None):
    """`window`: what `window()` gave before a checkpoint, when resuming from it."""
    self.flops_per_token, self.peak, self._warmup = flops_per_token, peak, warmup
    self._pending, self._times = None, []
    self._fetched = list((window or {}).get("steps", []))
    self._last, self._excluded = None, 0.0

  def add(self, step: int, metrics: dict) -> None:
    self.check()
    now = time.perf_counter()
    if self._last is not None:
      if self._warmup > 0:
        self._warmup -= 1
      else:
        self._times.append(now - self._last - self._excluded)
    self._last, self._excluded, self._pending = now, 0.0, (step, metrics)

  @contextlib.contextmanager
  def excluded(self):
    """Work between steps whose time is not step time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - start

  def check(self) -> None:
    """Fetches (and checks) every step so far: call before saving a checkpoint."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    fetched = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (np.isfinite(fetched["loss"]) and np.isfinite(fetched["grad_norm"])):
      raise FloatingPointError(f"step {step}: the loss is {fetched['loss']} and the gradient "
                               f"norm {fetched['grad_norm']}")
    self._fetched.append(fetched)

  def window(self) -> dict:
    """The fetched metrics since the last summary (JSON), saved with a checkpoint for resuming."""
    self.check()
    return {"steps": list(self._fetched)}

  def summary(self, keep: bool = False) -> dict[str, float]:
    """Mean loss, nll and accuracy since the last summary, the last gradient norm and learning
    rate, throughput and MFU (once timed). `keep`: the steps count toward the next one too."""
    self.check()
    steps = self._fetched
    if not keep:
      self._fetched = []
    record = {f"train/{k}": float(np.mean([m[k] for m in steps]))
              for k in ("loss", "nll", "accuracy")}
    record.update({f"train/{k}": steps[-1][k] for k in ("grad_norm", "learning_rate")
                   if k in steps[-1]})
    if self._times:
      step_time = float(np.mean(self._times))
      rate = float(np.mean([m["tokens"] for m in steps])) / step_time
      record.update({"train/step_time": step_time, "train/tokens_per_sec": rate})
      if np.isfinite(self.peak):
        record["train/mfu"] = rate * self.flops_per_token / self.peak
    self._times = []
    return record


def format_line(step: int, total: int, record: dict) -> str:
  """A log line: the step, then what `record` has of loss, throughput, MFU, ETA and eval."""
  shown = {"train/loss": lambda v: f"loss {v:.4f}",
           "train/tokens_per_sec": lambda v: f"{v / 1e3:.1f}k tok/s",
           "train/mfu": lambda v: f"MFU {v:.1%}",
           "train/step_time": lambda v: f"ETA {(total - step) * v:.0f} s",
           "eval/loss": lambda v: f"eval loss {v:.4f} | acc {record['eval/accuracy']:.3f}"}
  return " | ".join([f"step {step:6d}/{total}"] + [
      show(record[key]) for key, show in shown.items() if key in record])


class MetricWriter:
  """Appends `{"step": s, key: value, ...}` lines to workdir/metrics.jsonl and TensorBoard scalars.

  Strict JSON: values that are not finite are left out. Only process 0 writes; TensorBoard
  needs tensorboardX. In a `gs://` workdir (no append) metrics.jsonl is rewritten whole at each
  record, and TensorBoard events are written locally, copied up every `sync_secs` and at close."""

  def __init__(self, workdir, sync_secs: float = 30.0):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = self._local = None
    if not self.enabled:
      return
    self._dir, self._sync_secs, self._synced = paths.path(workdir), sync_secs, 0.0
    self._file = self._dir / "metrics.jsonl"
    if paths.is_url(self._file):
      self._lines = self._file.read_text().splitlines(True) if self._file.exists() else []
      if self._lines and not self._lines[-1].endswith("\n"):
        self._lines[-1] += "\n"
      self._local = tempfile.mkdtemp(prefix="llmjax-events-")
    else:
      torn = False
      if self._file.exists() and self._file.stat().length:
        with self._file.open("rb") as f:
          f.seek(-1, os.SEEK_END)
          torn = f.read(1) != b"\n"
      self._jsonl = self._file.open("a")
      if torn:  # a run killed mid-line: end that line so the next record stands alone
        self._jsonl.write("\n")
    self._tb = _tensorboard_writer(self._local or str(self._dir))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if np.isfinite(float(v))}
    line = json.dumps({"step": int(step), **clean}, allow_nan=False) + "\n"
    if self._jsonl is None:
      self._lines.append(line)
      self._file.write_text("".join(self._lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        self._tb.add_scalar(key, value, step)
      if self._local and time.monotonic() - self._synced > self._sync_secs:
        self._sync()

  def _sync(self) -> None:
    self._tb.flush()
    for name in os.listdir(self._local):
      (self._dir / name).write_bytes(epath.Path(self._local, name).read_bytes())
    self._synced = time.monotonic()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      if self._local:
        self._sync()
        shutil.rmtree(self._local, ignore_errors=True)


def _tensorboard_writer(workdir: str):
  """tensorboardX's SummaryWriter for workdir, or None without it. Torch is hidden from its
  import (we pass floats, not tensors): it would add 2-3 s to each start."""
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


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl, in order; a line torn by a kill is skipped (a run
  resumed after one logs the steps after its checkpoint again, with the same values)."""
  records, file = [], paths.path(workdir) / "metrics.jsonl"
  if not file.exists():
    return records
  with file.open() as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        records.append(json.loads(line))
  return records
