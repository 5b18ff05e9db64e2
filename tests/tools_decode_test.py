"""tools/bench_decode.py end to end at a laptop size: it prints its table with positive rates."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_prints_positive_rates():
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "bench_decode.py"), "--models=tiny",
       "--batches=1,2", "--prompt_len=16", "--new_tokens=16", "--repeats=1",
       "--flat_lengths=16", "--skip_torch"],
      env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^tiny\s+(\d+)\s+llmjax\s+([\d,.]+)\s+([\d,.]+)\s+([\d.]+)",
                    proc.stdout, re.M)
  assert [int(r[0]) for r in rows] == [1, 2], proc.stdout
  for _, prefill, decode_rate, _ in rows:
    assert float(prefill.replace(",", "")) > 0 and float(decode_rate.replace(",", "")) > 0
  assert "decode ms/token at batch 1 by new tokens: 16:" in proc.stdout
  assert "batch 2 / batch 1" in proc.stdout
