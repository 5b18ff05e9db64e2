"""A resumed run's config against its workdir's: the schedule of the steps taken is kept."""

import pytest

from llmjax import paths, train
from llmjax.train import workdir


def test_longer_run_keeps_its_schedule_and_says_so(tmp_path):
  """train.steps 100 -> 130 keeps the 100-step schedule (decay_steps=100, logged); asking
  for another schedule length on the resumed run is refused; a fresh workdir is untouched."""
  run_dir = paths.open_dir(tmp_path)
  config = train.base_config()
  config.train.steps = 100
  assert workdir.reconcile(run_dir, config, print) is config  # nothing there yet
  workdir.write_config(run_dir, config)
  (tmp_path / "checkpoints").mkdir()
  longer = train.base_config()
  longer.train.steps = 130
  lines = []
  resolved = workdir.reconcile(run_dir, longer, lines.append)
  assert resolved.optimizer.decay_steps == 100 and resolved.train.steps == 130
  assert lines == ["train.steps 100 -> 130: the learning-rate schedule stays the first run's "
                   "(100 steps: optimizer.decay_steps=100); steps past it keep its final rate"]
  assert float(train.build(resolved).schedule(120)) == pytest.approx(config.optimizer.final_learning_rate)
  longer.optimizer.decay_steps = 130
  with pytest.raises(ValueError, match="optimizer.decay_steps=130, but the run in .* follows "
                                       "a schedule of 100 steps"):
    workdir.reconcile(run_dir, longer, lines.append)
