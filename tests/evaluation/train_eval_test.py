"""Evaluation tasks during training: their metrics land in metrics.jsonl as eval/<task>/<metric>,
and the perplexity of the validation text is exactly the trainer's own eval loss; so is
tools/evaluate.py's, run on the workdir afterwards on a mesh of 8 devices."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from llmjax import data, train
from llmjax.metrics import read_metrics

from tests.train.train_test import ROOT, experiment


def test_eval_tasks_run_with_the_evals_and_perplexity_is_the_eval_loss(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(open(os.__file__).read()[:12000])
  val = data.split_source(data.TextSource(str(corpus), split="file"), 0.1, method="tail")[1][0]
  (tmp_path / "val.txt").write_text(val)
  (tmp_path / "mc.jsonl").write_text(json.dumps(
      {"context": "import", "choices": [" os", " xyzzy"], "label": 0}) + "\n")
  config = experiment("shakespeare_char", "baseline")
  config.data.path = str(corpus)
  config.model.vocab_size, config.batch_size = 128, 8  # the batch over 8 devices
  config.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=1000, sample_tokens=0,
                      eval_tasks=(f"perplexity:{tmp_path}/val.txt",
                                  f"multiple_choice:{tmp_path}/mc.jsonl"))
  train.train(config, str(tmp_path / "run"), log=lambda line: None)
  evals = [r for r in read_metrics(str(tmp_path / "run")) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 2]
  for r in evals:
    assert r["eval/val/tokens"] == r["eval/tokens"] == len(val) - 1
    assert math.isclose(r["eval/val/perplexity"], math.exp(r["eval/loss"]), rel_tol=1e-4)
    assert r["eval/mc/count"] == 1 and r["eval/mc/acc"] in (0.0, 1.0)
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), f"--workdir={tmp_path}/run",
       f"--task=perplexity:{tmp_path}/val.txt", f"--output={tmp_path}/results.json",
       "--mesh=4,2,1", "--batch_size=4"], env={**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS":
          os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"},
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads((tmp_path / "results.json").read_text())["results"]["val"]
  assert math.isclose(got["perplexity"], evals[-1]["eval/val/perplexity"], rel_tol=1e-5)
  assert re.search(r"^val +perplexity +[0-9.]+$", out.stdout, re.M), out.stdout
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"),
                        f"--workdir={tmp_path}/run", "--task=perplexity:nowhere.txt"],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
      "evaluate.py: eval task 'perplexity:nowhere.txt': no file nowhere.txt"]
  config.train.eval_tasks = ("perplexity:nowhere.txt",)
  with pytest.raises(ValueError, match="eval task 'perplexity:nowhere.txt': no file nowhere.txt"):
    train.train(config, str(tmp_path / "run2"), log=lambda line: None)
  assert not os.path.exists(tmp_path / "run2" / "checkpoints")
