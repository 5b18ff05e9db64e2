"""The README's examples run as written: the sharding example and the custom-model training
example (in a fresh interpreter, which must exit without a traceback)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example(heading: str) -> str:
  """The first ```python block after `heading` in README.md."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index(f"\n{heading}\n")
  return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_sharding_example_runs(capsys):
  """On the tests' 8 devices: the parameters are born sharded over (2, 2, 2)."""
  exec(compile(example("### Sharding"), "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert out.strip() == "(8, 128, 256) P('fsdp', 'tensor')", out


def test_custom_model_example_trains_sharded_and_exits_cleanly(tmp_path):
  """The custom module trains on 8 devices (its loss falls), and the interpreter exits with
  nothing on stderr: no traceback from pipelines left open."""
  script = tmp_path / "example.py"
  script.write_text(example("### Training your own model"))
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
  losses = [float(line.split()[1]) for line in proc.stdout.splitlines()]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, proc.stdout
