"""`python -m llmjax.main` with a bad command line ends in one line naming the bad input, not
ml_collections' tracebacks. (llmjax.main is not imported here: its absl flags would clash with
tools/sweep.py's in this process.)"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bad_command_lines_are_one_line_errors(tmp_path):
  """A misspelled key (on the default config and on an experiment), an unknown variant, a
  missing experiment file and a value of the wrong type: exit 1, one stderr line, nothing run."""
  cases = [
      (["--config.optimizer.learning_rat=1e-3"],
       "llmjax.main: --config.optimizer.learning_rat: no such field; did you mean "
       "optimizer.learning_rate?"),
      (["--config=experiments/gpt.py:huge", "--config.train.steps=5"],
       "llmjax.main: experiments/gpt.py: unknown variant 'huge'; expected tiny or small"),
      (["--config=experiments/nope.py"],
       "llmjax.main: --config=experiments/nope.py does not exist; experiments/ holds "),
      (["--config", "experiments/bert.py:tiny", "--config.train.steps", "abc"],
       "llmjax.main: --config.train.steps=abc: expected an int"),
  ]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  for args, message in cases:
    proc = subprocess.run([sys.executable, "-m", "llmjax.main", f"--workdir={tmp_path}/w", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.strip().startswith(message), (args, proc.stderr[-2000:])
    assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr[-2000:])
  assert not (tmp_path / "w").exists()
