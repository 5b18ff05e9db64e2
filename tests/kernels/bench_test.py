"""tools/bench_attention.py on CPU: it checks the interpreted kernel and says why no timings."""

import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_attention_checks_correctness_on_cpu():
  out = subprocess.run(
      [sys.executable, "tools/bench_attention.py", "--shapes=1x136x2x64", "--dtype=float32",
       "--bias"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  line = next(l for l in out.stdout.splitlines() if "1x136x2x64" in l)
  diffs = [float(x) for x in re.findall(r"\d\.\d\de[-+]\d\d", line)]
  assert len(diffs) == 4 and max(diffs) < 2e-5, line
  assert "timings need a TPU or GPU" in out.stdout


def test_bench_attention_compiles_for_targets_without_them():
  """--targets: per target what the compiled kernels use (here one GPU, whose figures are
  ptxas's), and an unknown target refused in one line."""
  run = lambda *args: subprocess.run(
      [sys.executable, "tools/bench_attention.py", *args], cwd=ROOT, capture_output=True,
      text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
  out = run("--targets=v3")
  assert out.returncode != 0 and "--targets: unknown v3; expected v4, v5e" in out.stderr
  if not importlib.util.find_spec("jax_plugins.xla_cuda13"):
    return  # targets_test.py warns that the GPU compiler is missing
  out = run("--targets=a100", "--shapes=1x256x2x64", "--nobias")
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.search(r"a100 +1x256x2x64  compiled in", out.stdout), out.stdout
  kernels = re.findall(r"(flash_attention_\w+) +shared memory +\d+ B, registers +\d+, "
                       r"spill stores +0 B, cp.async [1-9]", out.stdout)
  assert sorted(kernels) == ["flash_attention_dkv_gpu", "flash_attention_dq_gpu",
                             "flash_attention_fwd_gpu"], out.stdout
