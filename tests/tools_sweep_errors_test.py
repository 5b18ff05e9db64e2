"""tools/sweep.py checks every run against the experiment's config before the first starts:
a bad key, value, variant or file ends the sweep in one line, with nothing launched."""

import os
import subprocess
import sys

import pytest

from tests.tools_train_test import sweep  # tools/sweep.py, its absl flags defined once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "experiments", "gpt.py")


def check(grid: str, config=f"{GPT}:tiny", fixed=None):
  runs = sweep.commands(sweep.expand_grid(grid), config, "root", fixed)
  sweep.check_runs(runs, config, fixed, {k: "--grid" for r in sweep.expand_grid(grid) for k in r})


def one_line_error(fn, *args, match: str, kind=ValueError, **kwargs):
  with pytest.raises(kind) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert match in message and "\n" not in message, message


def test_every_key_and_value_is_checked_before_any_run():
  """Misspelled keys name the nearest field and where they came from; values must parse for
  the field's type; each run's config must be in range; good sweeps pass."""
  check("optimizer.learning_rate=1e-3,3e-3;model.num_layers=2,4", fixed={"train.steps": "6"})
  check("mesh.shape=(-1,1,1),(1,1,1)", config=None)
  one_line_error(check, "optimizer.learning_rat=1e-3,3e-3",
                 match="--grid: optimizer.learning_rat: no such field; did you mean "
                       "optimizer.learning_rate?")
  one_line_error(check, "seed=1,2", fixed={"model.num_layer": "2"},
                 match="--set: model.num_layer: no such field; did you mean model.num_layers?")
  one_line_error(check, "train.steps=10,ten", match="--grid: train.steps=ten: expected an int")
  one_line_error(check, "train.steps=10,-5",
                 match="run train.steps=-5: train.steps=-5 must be an int >= 0")
  one_line_error(check, "seed=1", config=f"{GPT}:huge",
                 match="gpt.py: unknown variant 'huge'; expected tiny or small")
  one_line_error(check, "seed=1", config=GPT.replace("gpt.py", "nope.py"),
                 match="nope.py does not exist", kind=FileNotFoundError)


def test_a_misspelled_sweep_file_key_launches_nothing(tmp_path):
  """The tool itself: one line on stderr, exit 1, no run's workdir made."""
  path = tmp_path / "sweep_file.py"
  path.write_text("def sweep():\n  return [{'seed': 1}, {'model.num_layer': 3}]\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sweep.py"),
                         "--config=experiments/gpt.py:tiny", f"--workdir={tmp_path}/root",
                         f"--sweep={path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.strip() == (f"sweep: {path}: model.num_layer: no such field; did you mean "
                                 f"model.num_layers?"), proc.stderr[-2000:]
  assert not (tmp_path / "root").exists()
