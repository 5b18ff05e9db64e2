"""The runner end to end: every family x objective learns, resume is bitwise, bad input is clear."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llmjax import train
from llmjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def experiment(name: str, variant: str = "tiny"):
  """The config of experiments/NAME.py, as --config=experiments/NAME.py:VARIANT gives it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.mark.parametrize("name", ["gpt", "bert", "t5", "prefix_lm"])
def test_each_experiment_learns_on_the_builtin_corpus(name, tmp_path):
  """20 steps of each tiny experiment (5 of warmup) lower its eval loss by at least 1 nat
  per token. GPT computes in bfloat16 (the mixed-precision policy) and still stores and
  updates float32 parameters; its float32 path learns in prefix_lm (the same network) and in
  shakespeare_char (the same objective)."""
  config = experiment(name)
  if name == "gpt":
    config.model.dtype = "bfloat16"
  config.optimizer.warmup_steps = 5
  config.train.update(steps=20, log_every=10, eval_every=20, eval_batches=2,
                      checkpoint_every=1000, sample_tokens=0)
  result = train.train(config, str(tmp_path), log=lambda line: None)
  evals = [h["eval/loss"] for h in result.history if "eval/loss" in h]
  assert len(evals) == 2 and evals[1] < evals[0] - 1.0, evals
  assert {x.dtype for x in jax.tree.leaves(result.params)} == {np.dtype("float32")}
  records = read_metrics(str(tmp_path))
  assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_sec",
          "train/mfu", "train/step_time"} <= set(records[1])
  assert {"eval/loss", "eval/accuracy", "eval/perplexity"} <= set(records[-1])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def run_main(workdir, *flags, env=None, wait=True):
  """`python -m llmjax.main --workdir=W FLAGS...` in a subprocess (the repo on its path);
  `env` adds variables to this one's, or with None removes them."""
  cmd = [sys.executable, "-m", "llmjax.main", f"--workdir={workdir}", *flags]
  env = {k: v for k, v in {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                           **(env or {})}.items() if v is not None}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


SMALL = ["--config.train.log_every=1", "--config.train.eval_every=1000",
         "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
         "--config.model.num_layers=2", "--config.model.dropout_rate=0.1",
         "--config.optimizer.warmup_steps=5", "--config.batch_size=4",
         "--config.objective.length=64", "--config.model.max_seq_len=64"]


# A constant learning rate: a run cut in two then has the schedule of the uninterrupted one,
# and runs of any length compile the same step (tests/conftest.py's cache shares it).
CONSTANT = ["--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0"]


def losses(workdir):
  """step -> train loss; a step logged twice (before a kill and after) keeps its last value."""
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def logged(workdir):
  """step -> the values of its train/ line but timing (a step logged twice, before a kill
  and after, keeps its last line)."""
  timing = {"train/tokens_per_sec", "train/step_time", "train/mfu"}
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/") and k not in timing}
          for r in read_metrics(workdir) if "train/loss" in r}


@pytest.mark.parametrize("flag,message", [
    ("--config.model.num_layer=3", "no such field; did you mean model.num_layers?"),
    ("--config.batch_size=7", "not divisible by the data-parallel size"),
    ("--config.mesh.shape=(3,1,1)", "mesh shape"),
    ('--config.mesh.rules={"emb": null}', "unknown logical axis 'emb'"),
    ("--config.data.shards=3", "data.shards=3 must be a multiple"),
])
def test_bad_config_is_a_clear_error(tmp_path, flag, message):
  """A misspelled key, a batch the data axes can't split, a mesh that isn't the devices."""
  code, out, err = run_main(tmp_path, *SMALL, "--config.train.steps=2", flag,
                            env={"JAX_NUM_CPU_DEVICES": "2"})
  assert code != 0 and message in out + err, (out + err)[-2000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("llmjax.main: ")


def test_workdir_of_another_model_is_refused(tmp_path):
  """Resuming a workdir with another model's checkpoints names the fields that differ. The
  log is quiet by default: no library INFO lines, though every step saves."""
  code, _, err = run_main(tmp_path, *SMALL, *CONSTANT, "--config.train.steps=2",
                          "--config.train.checkpoint_every=1")
  assert code == 0, err[-2000:]
  assert not re.search(r"^I\d{4} ", err, re.M), err[-2000:]
  code, out, err = run_main(tmp_path, *SMALL, "--config.train.steps=4",
                            "--config.model.d_model=64")
  assert code != 0 and "different model" in err and "d_model" in err, err[-2000:]
  assert json.load(open(tmp_path / "config.json"))["model"]["d_model"] == 128


def test_rules_override_moves_a_logical_axis():
  """mesh.rules remaps logical names for one experiment: here the MLP width leaves the
  tensor axis for fsdp, and the embedding width is no longer split."""
  from jax.sharding import PartitionSpec as P
  from llmjax.train import step
  config = experiment("gpt")
  config.mesh.shape = (2, 2, 2)
  config.mesh.rules = '{"mlp": "fsdp", "embed": null}'
  _, shardings, _ = step.init_state(train.build(config), jax.random.key(0))
  mlp = shardings["params"]["layers_0"]["mlp"]
  assert mlp["wi"]["kernel"].spec == P(None, "fsdp"), mlp
  assert mlp["wo"]["kernel"].spec == P("fsdp", None), mlp


def test_init_compiled_for_a_quick_start_draws_the_same_parameters(monkeypatch):
  """On CPU, init compiles at LLVM -O1 (step._init_options): the parameters are the bits
  -O3, XLA's default, draws. The tests' XLA_FLAGS set a level of their own, which wins."""
  from llmjax.train import step
  assert step._init_options() is None
  monkeypatch.setenv("XLA_FLAGS", "")
  options = step._init_options()
  assert options == {"xla_backend_optimization_level": 1}
  config = experiment("gpt")
  config.model.update(num_layers=1, d_model=64, num_heads=2)
  _, _, init = step.init_state(train.build(config), jax.random.key(0))
  lowered = init.lower(jax.random.key(0))
  quick, default = (lowered.compile(compiler_options=o)(jax.random.key(0)) for o in (
      options, {"xla_backend_optimization_level": 3}))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(quick),
                                                  jax.tree.leaves(default)))


def test_shakespeare_char_experiment_runs_on_any_text(tmp_path):
  """The nanoGPT experiment's data path (characters of one file, tail split, random-offset
  windows) on a small stand-in text: its vocabulary is that file's characters and it learns."""
  rng = np.random.default_rng(0)
  words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "come", "ROMEO:"]
  text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(3000)) + "\n"
  (tmp_path / "play.txt").write_text(text)
  config = experiment("shakespeare_char", "baseline")
  config.data.path = str(tmp_path / "play.txt")
  config.batch_size = 8
  config.model.vocab_size = len(set(text))
  config.optimizer.warmup_steps = 5
  config.train.update(steps=20, log_every=10, eval_every=20, eval_batches=4,
                      checkpoint_every=1000, sample_tokens=0)
  result = train.train(config, str(tmp_path / "w"), log=lambda line: None)
  assert result.setup.tokenizer.vocab_size == len(set(text))
  evals = [h["eval/loss"] for h in result.history if "eval/loss" in h]
  assert evals[1] < evals[0] - 1.0, evals
  # The speedrun (the same model) evaluates once, at its end: train.eval_on_start=False.
  speedrun = experiment("shakespeare_speedrun", "speedrun")
  assert not speedrun.train.eval_on_start
  config.train.update(steps=3, eval_every=3, eval_on_start=False)
  result = train.train(config, str(tmp_path / "speedrun"), log=lambda line: None)
  assert [h["step"] for h in result.history if "eval/loss" in h] == [3]


def test_signal_stops_at_the_next_step_and_the_summary_says_so(tmp_path):
  """SIGTERM (a scheduler's preemption) while step 3's line is printed stops the run after at
  most the step in flight: that step is logged and saved (the only checkpoint: none at step 1
  or elsewhere off checkpoint_every), no sample, exit status 143; no log line holds a nan
  (step 1 is not timed) and metrics.jsonl is strict JSON. Rerun with more steps: the schedule
  of the first run is kept and said so, and the summary covers the whole run, its first
  segment included."""
  flags = SMALL + ["--config.train.steps=500", "--config.train.eval_every=0",
                   "--config.train.checkpoint_every=1000", "--config.train.sample_tokens=20",
                   "--config.train.log_every=1"]
  proc = run_main(tmp_path, *flags, wait=False, env={"PYTHONUNBUFFERED": "1"})
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step      3/"):
      proc.send_signal(signal.SIGTERM)
      seen = len(lines)
      break
  out, err = proc.communicate(timeout=300)
  lines += out.splitlines(True)
  assert proc.returncode == 143, err[-2000:]
  stopped = int(re.search(r"SIGTERM: saved step (\d+)", "".join(lines)).group(1))
  assert 3 <= stopped <= 4, lines  # step 4 may have been in flight
  assert f"stopped at step {stopped} of 500 (SIGTERM)" in lines[-1], lines
  assert "sample" not in "".join(lines), lines
  assert not any("nan" in line for line in lines if line.startswith("step")), lines
  assert len(lines) - seen <= 4, lines  # no more steps after the stop
  assert os.listdir(tmp_path / "checkpoints") == [str(stopped)]
  assert [r["step"] for r in strict_records(tmp_path) if "train/loss" in r] == list(
      range(1, stopped + 1))
  code, out, err = run_main(tmp_path, *SMALL, f"--config.train.steps={stopped + 2}",
                            "--config.train.eval_every=1", "--config.train.sample_tokens=20")
  assert code == 0, err[-2000:]
  assert (f"train.steps 500 -> {stopped + 2}: the learning-rate schedule stays the first "
          f"run's (500 steps") in out, out
  assert f"(step {stopped + 1} -> {stopped + 2})" in out and "sample:" in out, out
  schedule = json.load(open(tmp_path / "config.json"))["optimizer"]["decay_steps"]
  assert schedule == 500
  assert [r["step"] for r in strict_records(tmp_path)][-2:] == [stopped + 1, stopped + 2]


def test_a_signal_after_the_steps_save_was_decided_stops_at_the_next_step(tmp_path, monkeypatch):
  """A signal that lands between step 3's save decision and the next step (here: as the loop
  leaves step 3's between-steps work) stops the run after step 4, logged and saved: a stop
  never claims a step it did not save."""
  from llmjax import metrics
  excluded, calls = metrics.StepMetrics.excluded, []

  @contextlib.contextmanager
  def then_signal(self):
    with excluded(self):
      yield
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.StepMetrics, "excluded", then_signal)
  config = experiment("gpt")
  config.train.update(steps=50, log_every=10, eval_every=0, checkpoint_every=1000,
                      sample_tokens=0)
  result = train.train(config, str(tmp_path), log=lambda line: None)
  assert (result.stopped, result.step) == ("SIGTERM", 4)
  assert [h["step"] for h in result.history] == [4]
  assert os.listdir(tmp_path / "checkpoints") == ["4"]


def strict_records(workdir):
  """metrics.jsonl parsed by a strict JSON parser (NaN and Infinity are not JSON)."""
  def refuse(constant):
    raise ValueError(f"{constant} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def test_a_runlocal_run_prints_a_short_log(tmp_path):
  """The 20-step CPU smoke run of the default experiment, as a user first runs it: our lines
  only (at most 25 with the sample), no library INFO line, no nan, no traceback at exit. A
  --config. flag given beside runlocal wins over its shrink (here a log every 10 steps, not
  5). With no JAX_COMPILATION_CACHE_DIR set, its programs go to the persistent compilation
  cache in the user's cache directory."""
  home = tmp_path / "home"
  code, out, err = run_main(tmp_path / "w", "--config.runlocal=True",
                            "--config.train.log_every=10",
                            env={"HOME": str(home), "JAX_COMPILATION_CACHE_DIR": None})
  assert code == 0, err[-2000:]
  assert any((home / ".cache/llmjax/compilation_cache").iterdir())
  lines = (out + err).splitlines()
  assert len(lines) <= 25 and "step     20/20" in out and "sample:" in out, out + err
  assert "kept train.log_every=10" in out and "step     10/20" in out, out
  assert "step      5/20" not in out, out
  assert not re.search(r"^[IW]\d{4} |Traceback", out + err, re.M), out + err
  assert not any("nan" in line for line in lines if line.startswith("step")), out


def test_a_full_disk_ends_in_one_clear_last_line(tmp_path):
  """Files capped at 64 KB, as a full disk fails them, from the first save on: exit 1, and
  the last line of stderr says which save failed and that no checkpoint is complete yet; no
  library traceback anywhere."""
  import shlex
  cmd = [sys.executable, "-m", "llmjax.main", f"--workdir={tmp_path}", *SMALL, *CONSTANT,
         "--config.train.steps=4", "--config.train.checkpoint_every=2"]
  # The cap (in KiB) and an ignored SIGXFSZ set by the shell the run is exec'd from: no
  # Python code runs between fork and exec in this multithreaded process.
  proc = subprocess.run(["bash", "-c", f"ulimit -f 64; trap '' XFSZ; exec {shlex.join(cmd)}"],
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                        text=True, timeout=300)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and last.startswith("llmjax.main: writing a checkpoint in "), (
      proc.stderr[-3000:])
  assert last.endswith("there is no complete checkpoint yet"), last
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 10, proc.stderr
