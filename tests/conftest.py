"""Test setup: 8 fake CPU devices (so meshes are real) and float32 matmuls at full precision."""

import os
import sys

# Before JAX initializes its backend: eight CPU devices, and the repo importable as-is.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
