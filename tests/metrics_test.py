"""Metrics: the device peak behind MFU, the step bookkeeping, the log line, the jsonl writer."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import metrics


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
  """The first run on a machine measures the CPU and caches the figure; later runs read it
  (no new measurement: MFU figures of runs compare), one figure per compute dtype; a
  configured peak wins."""
  measure = metrics.measured_cpu_flops
  monkeypatch.setattr(metrics, "PEAK_CACHE", str(tmp_path / "peak.json"))
  monkeypatch.setattr(metrics, "measured_cpu_flops", lambda dtype: {"float32": 1.5e11,
                                                                    "bfloat16": 3e11}[dtype])
  first, source = metrics.peak_flops()
  assert first == 1.5e11 and "cached in" in source and "measured once" in source
  assert metrics.peak_flops(dtype="bfloat16")[0] == 3e11  # a bfloat16 model's own peak
  monkeypatch.setattr(metrics, "measured_cpu_flops", lambda dtype: pytest.fail("measured again"))
  assert metrics.peak_flops()[0] == first and metrics.peak_flops(dtype=jnp.bfloat16)[0] == 3e11
  assert sorted(json.load(open(tmp_path / "peak.json")).values()) == [first, 3e11]
  assert metrics.peak_flops(2e12) == (2e12, "configured: train.peak_flops")
  assert measure(64, 2, "bfloat16") > 0


@pytest.mark.parametrize("kind,per_chip", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12)])
def test_accelerator_peaks_come_from_the_table(kind, per_chip, monkeypatch):
  """Each device kind as JAX names it gets its data-sheet bf16 peak, times the devices."""
  device = types.SimpleNamespace(device_kind=kind, platform="tpu")
  monkeypatch.setattr(jax, "devices", lambda: [device] * 4)
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  peak, source = metrics.peak_flops()
  assert peak == 4 * per_chip and kind in source


def test_step_metrics_check_each_step_and_never_report_nan():
  """Step 1's metrics are fetched when step 2 arrives; a summary before any step was timed
  has no throughput (not nan); a non-finite loss names its step."""
  tracker = metrics.StepMetrics(flops_per_token=10.0, peak=1e3, warmup=1)
  step = {"loss": jnp.float32(2.0), "nll": jnp.float32(2.0), "accuracy": jnp.float32(0.5),
          "tokens": jnp.int32(100), "grad_norm": jnp.float32(1.0)}
  tracker.add(1, step)
  record = tracker.summary()
  assert record == {"train/loss": 2.0, "train/nll": 2.0, "train/accuracy": 0.5,
                    "train/grad_norm": 1.0}
  assert "nan" not in metrics.format_line(1, 10, record)
  for i in (2, 3, 4):
    tracker.add(i, step)
  record = tracker.summary()
  assert record["train/step_time"] > 0 and np.isclose(
      record["train/mfu"], record["train/tokens_per_sec"] * 10.0 / 1e3)
  assert "tok/s" in metrics.format_line(4, 10, record)
  tracker.add(5, dict(step, loss=jnp.float32(np.nan)))
  with pytest.raises(FloatingPointError, match="step 5: the loss is nan"):
    tracker.check()


def test_metric_writer_ends_a_torn_line(tmp_path):
  """A line torn by a kill is ended before the next record, which then reads back."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "tr')
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(3, {"train/loss": 1.5})
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 3]


def test_the_host_runs_at_most_one_step_ahead():
  """add(k) returns only once step k-1's metrics are computed: a loop that dispatches steps
  asynchronously is never more than a step ahead of the devices, so a signal or a NaN is
  acted on within a step (not at the next log line, 10-50 dispatched steps later)."""
  slow = jax.jit(lambda x: jax.lax.fori_loop(0, 200, lambda i, y: jnp.tanh(y @ y), x))
  tracker = metrics.StepMetrics(1.0, 1.0)
  x = jnp.ones((256, 256)) / 256
  first = {"loss": jnp.sum(slow(x)), "grad_norm": jnp.float32(1.0), "nll": jnp.float32(1.0),
           "accuracy": jnp.float32(0.0), "tokens": jnp.int32(1)}
  tracker.add(1, first)
  tracker.add(2, dict(first, loss=jnp.sum(slow(x + 1))))
  assert first["loss"].is_ready()
