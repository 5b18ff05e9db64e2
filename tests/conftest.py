"""Test setup: 8 fake CPU devices (so meshes are real), float32 matmuls at full precision,
XLA's quick compile on CPU, and one persistent compilation cache for the whole run.

Compiling, not computing, is most of a test's time at tests' tiny shapes. XLA's CPU backend
without LLVM's optimization passes and without its fusion emitters compiles 2-4x faster; the
programs compute the same values (what a test checks), only slower at large shapes. The
flags reach every process of the run (xdist workers, the tests' subprocesses) through
XLA_FLAGS.

The cache lives for one pytest invocation: the controller creates it, xdist workers and the
`python -m llmjax.main` subprocesses of the tests inherit it through the environment. A
program compiled once (the same step of the same model on the same devices) is then loaded
instead of recompiled by the other runs of a test (resume, kill and restart) and by other
tests; XLA's output for one program is the same either way, so what a test proves does not
change, only the 10-20 s that each tiny model's init and step take to compile on CPU.
"""

import atexit
import os
import shutil
import sys
import tempfile

# Before JAX initializes its backend: eight CPU devices, and the repo importable as-is.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if QUICK_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILE}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a run without xdist)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmjax-test-compiles-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  # Programs that compile in under a second are not worth a file; the sweep's and the runs'
  # steps and inits all take longer.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  # The runs' CPU matmul peak (for MFU), measured while the suite loads both cores, stays
  # with the run, not in the user's cache.
  os.environ["LLMJAX_PEAK_CACHE"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                                 "llmjax_peak_flops.json")

# Cloud Storage clients talk to the tests' emulator (the `gcs` fixture), anonymously, never
# with a machine's real credentials. gcsfs reads the first at import: its gRPC lookup of a
# bucket's namespace layout is not something an emulator answers.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake")  # tensorstore
os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")  # gcsfs

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# The modules of long tests (training runs, subprocesses, the interpreted kernel in whole
# models) run first: xdist hands tests out in this order, so the short ones that come last
# even out the workers instead of one long test running alone at the end.
LONG_FIRST = ("tests/train/robustness_test.py", "tests/train/train_test.py",
              "tests/train/gcs_test.py", "tests/train/integrity_test.py",
              "tests/tools_train_test.py", "tests/checkpoint_test.py",
              "tests/kernels/targets_test.py",
              "tests/kernels/models_test.py",
              "tests/tools_test.py", "tests/hf_test.py")


def pytest_collection_modifyitems(items):
  rank = {path: i for i, path in enumerate(LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FIRST)))


@pytest.fixture(scope="session")
def gcs():
  """A fresh in-memory Cloud Storage emulator (tests/gcs_emulator.py) with the bucket
  `bucket`; every client (gcsfs under epath, tensorstore under Orbax, google-cloud-storage),
  here and in the subprocesses the tests start, talks to it. Yields its URL."""
  import subprocess
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                        "gcs_emulator.py"), "bucket"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = proc.stdout.readline()  # "READY <port>" within a fraction of a second
  if not line.startswith("READY"):
    proc.kill()
    pytest.fail(f"the GCS emulator did not start: {line!r}")
  url = f"http://127.0.0.1:{line.split()[1]}"
  import fsspec.config  # imported already by torch or huggingface_hub: the variable is late
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ["STORAGE_EMULATOR_HOST"] = url  # gcsfs, google-cloud-storage
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = url  # tensorstore (Orbax's arrays)
  yield url
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(10)
