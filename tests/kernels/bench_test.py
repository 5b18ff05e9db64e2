"""tools/bench_attention.py on CPU: it checks the interpreted kernel and says why no timings."""

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
