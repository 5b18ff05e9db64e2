"""llmjax.allocator: glibc tuned for XLA:CPU only where JAX runs on the CPU and nobody chose."""

import os
import subprocess
import sys

from llmjax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tuned_only_on_a_cpu_machine_where_nobody_chose(tmp_path):
  none = (str(tmp_path / "accel*"),)
  assert allocator.wanted({}, none)
  assert allocator.wanted({"JAX_PLATFORMS": "cpu"}, none)
  for chosen in ({"MALLOC_ARENA_MAX": "4"}, {"MALLOC_TOP_PAD_": "0"},
                 {"MALLOC_MMAP_THRESHOLD_": "131072"},
                 {"LLMJAX_MALLOC": "default"}, {"JAX_PLATFORMS": "tpu"},
                 {"JAX_PLATFORMS": "cuda,cpu"}):
    assert not allocator.wanted(chosen, none), chosen
  (tmp_path / "accel0").touch()  # a TPU VM's chip
  assert not allocator.wanted({}, none)
  assert allocator.wanted({"JAX_PLATFORMS": "cpu"}, none)  # told to run on the CPU anyway


def test_a_fresh_process_is_tuned():
  """glibc (Linux) accepts the settings in a process that has not started JAX."""
  env = {k: v for k, v in os.environ.items()
         if k not in (*allocator.ENVIRONMENT, "LLMJAX_MALLOC")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", "from llmjax import allocator; "
                        "print(allocator.tune())"], env=env, capture_output=True, text=True)
  assert out.stdout.strip() == "True", out.stderr
