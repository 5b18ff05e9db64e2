"""The runner under stress: kills mid-save, several hosts, other meshes, NaNs, full disks."""

import concurrent.futures
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from llmjax import checkpoint, paths, train
from llmjax.metrics import read_metrics
from llmjax.train import step
from tests.train.train_test import (CONSTANT, ROOT, SMALL, experiment, logged, losses,
                                   run_main)


def small_config(steps: int, **train_kwargs):
  """The tiny GPT experiment with 2 layers and 64-token rows, in-process, at a constant
  learning rate (runs of any length compile the same step: tests/conftest.py's cache)."""
  config = experiment("gpt")
  config.model.update(num_layers=2, max_seq_len=64)
  config.objective.length = 64
  config.batch_size = 8  # the 8 test devices split it
  config.optimizer.update(schedule="constant", warmup_steps=0)
  config.train.update(**{"steps": steps, "log_every": 1, "eval_every": 1000, "eval_batches": 1,
                         "sample_tokens": 0, **train_kwargs})
  return config


def saved_state(workdir, step: int) -> dict:
  """The whole train state (parameters, optimizer state, step) of checkpoint `step`, as
  numpy arrays."""
  import orbax.checkpoint as ocp
  directory = epath.Path(workdir) / "checkpoints" / str(step) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(directory)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            getattr(meta, "tree", meta))
    state = handler.restore(directory, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
  finally:
    handler.close()
  return jax.tree.map(np.asarray, state)


def test_chaos_sigkill_at_random_moments_then_resume(tmp_path):
  """Chaos: a run that saves every step (two kept, so saves and deletions overlap the steps;
  dropout on, so the data order and the rng both matter) is killed -9 at 5 seeded random
  moments, each 0-0.4 s after its restart saved a new step, and restarted each time. Each
  restart resumes from the newest complete checkpoint; the final run's log lines (a line
  every 3 steps, so resumed windows straddle checkpoints) equal an uninterrupted run's line
  for line, and the final state (parameters, optimizer state, step) equals its bit for bit."""
  steps = 20
  flags = SMALL + CONSTANT + [f"--config.train.steps={steps}", "--config.train.log_every=3",
                              "--config.train.eval_every=0", "--config.train.checkpoint_every=1",
                              "--config.train.keep_checkpoints=2"]
  code, _, err = run_main(tmp_path / "a", *flags)
  assert code == 0, err[-2000:]
  checkpoints = tmp_path / "b" / "checkpoints"

  def newest():
    saved = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if (
        checkpoints.is_dir()) else []
    return max(saved, default=0)

  rng, resumed = random.Random(12), 0
  for kill in range(5):
    proc = run_main(tmp_path / "b", *flags, wait=False)
    deadline = time.time() + 300
    while newest() <= resumed and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.4))
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (kill, out[-2000:], err[-2000:])
    if resumed:
      assert f"resumed from {checkpoints} at step {resumed}" in out, (kill, out[-2000:])
    resumed = newest()
  assert resumed < steps, "the kills came too late to interrupt the run"
  code, out, err = run_main(tmp_path / "b", *flags)
  assert code == 0 and f"resumed from {checkpoints} at step {resumed}" in out, err[-2000:]
  assert logged(tmp_path / "b") == logged(tmp_path / "a")
  a, b = saved_state(tmp_path / "a", steps), saved_state(tmp_path / "b", steps)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sigints_in_the_first_seconds_exit_cleanly(tmp_path):
  """10 runs, each sent SIGINT at a seeded random moment in its own second of the first 10 s
  (Python starting, imports, JAX's backend, compiling the init and the step, the first steps;
  five run at once, so startups are slow and most signals land in them): each exits with
  status 130 within 30 s of its signal (none swallowed: no run trains on), none with a fatal
  error, and a run the signal reached in training saved its step first."""
  rng = random.Random(20)
  moments = [i + rng.uniform(0, 1) for i in range(10)]  # one in each second
  flags = SMALL + CONSTANT + ["--config.train.steps=100000"]

  def trial(i):
    out, err = tmp_path / f"{i}.out", tmp_path / f"{i}.err"
    with open(out, "w") as o, open(err, "w") as e:
      proc = subprocess.Popen(
          [sys.executable, "-m", "llmjax.main", f"--workdir={tmp_path / str(i)}", *flags],
          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"},
          stdout=o, stderr=e)
      time.sleep(moments[i])
      alive = proc.poll() is None
      proc.send_signal(signal.SIGINT)
      try:
        code = proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        code = "still running 30 s after SIGINT"
    return i, alive, code, out.read_text(), err.read_text()

  with concurrent.futures.ThreadPoolExecutor(5) as pool:
    results = list(pool.map(trial, range(10)))
  for i, alive, code, out, err in results:
    where = f"run {i}, SIGINT at {moments[i]:.2f} s"
    assert alive, f"{where}: exited before the signal: {err[-2000:]}"
    assert code in (130, -signal.SIGINT), f"{where}: exit {code}: {out[-1000:]} {err[-2000:]}"
    assert "Fatal Python error" not in err and "Segmentation fault" not in err, (where, err)
    if code == -signal.SIGINT:  # Python's own start, before llmjax.main installs handlers
      assert not out, (where, out)
    if re.search(r"^step +\d+/\d+ \| loss", out, re.M):  # stopped in training: saved first
      assert re.search(r"SIGINT: saved step \d+", out), (where, out)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path, gcs):
  """jax.distributed with two processes of 4 CPU devices each on one (2, 2, 2) mesh, writing
  to one gs:// workdir as a pod does (the Cloud Storage emulator): each reads its own shard
  of the data, both write their parts of one checkpoint into the bucket (data-iterator
  states and array shards), and the losses equal one process's with 8 devices reading the
  same two shards; so do the eval tasks' scores (their batches span both processes' devices)."""
  (tmp_path / "val.txt").write_text("def f(x):\n  return x + 1\n" * 20)
  flags = SMALL + CONSTANT + ["--config.train.steps=4", "--config.train.checkpoint_every=2",
                              "--config.model.dropout_rate=0.0", "--config.batch_size=8",
                              "--config.mesh.shape=(2,2,2)", "--config.data.shards=2",
                              f"--config.train.eval_tasks=('perplexity:{tmp_path}/val.txt',)"]
  port, two = _free_port(), "gs://bucket/robustness/two"
  procs = [run_main(two, *flags, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}", wait=False,
                    env={"JAX_NUM_CPU_DEVICES": "4"}) for i in range(2)]
  code, _, err = run_main(tmp_path / "one", *flags, env={"JAX_NUM_CPU_DEVICES": "8"})
  assert code == 0, err[-2000:]
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  one, two_losses = losses(tmp_path / "one"), losses(two)
  assert sorted(one) == sorted(two_losses) == [1, 2, 3, 4]
  np.testing.assert_allclose([two_losses[s] for s in one], [one[s] for s in one], rtol=1e-5)
  evals = [{r["step"]: r["eval/val/perplexity"] for r in read_metrics(str(w))
            if "eval/val/perplexity" in r} for w in (tmp_path / "one", two)]
  assert sorted(evals[0]) == sorted(evals[1]) == [0, 4]
  np.testing.assert_allclose([evals[1][s] for s in (0, 4)], [evals[0][s] for s in (0, 4)],
                             rtol=1e-5)
  step_dir = paths.path(two) / "checkpoints" / "4"
  assert {p.name for p in (step_dir / "data").iterdir()} >= {"process_0-of-2.json",
                                                             "process_1-of-2.json"}
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (step_dir / "state").iterdir()}


def test_sharded_equals_single_device_and_resumes_onto_another_mesh(tmp_path):
  """Two steps on a (2, 2, 2) mesh of 8 devices, two more resumed on (1, 2, 2) of 4 devices:
  the losses of all four equal a single device's uninterrupted run. (--verbosity=0 there
  adds the libraries' INFO lines.)"""
  flags = SMALL + CONSTANT + ["--config.model.dropout_rate=0.0", "--config.batch_size=8",
                              "--config.train.checkpoint_every=2"]
  code, _, err = run_main(tmp_path / "one", *flags, "--config.train.steps=4",
                          "--config.mesh.shape=(1,1,1)", "--verbosity=0",
                          env={"JAX_NUM_CPU_DEVICES": "1"})
  assert code == 0, err[-2000:]
  assert re.search(r"^I\d{4} .*pipeline", err, re.M), err[-2000:]  # INFO lines when asked
  code, _, err = run_main(tmp_path / "moved", *flags, "--config.train.steps=2",
                          "--config.mesh.shape=(2,2,2)", env={"JAX_NUM_CPU_DEVICES": "8"})
  assert code == 0, err[-2000:]
  code, out, err = run_main(tmp_path / "moved", *flags, "--config.train.steps=4",
                            "--config.mesh.shape=(1,2,2)", env={"JAX_NUM_CPU_DEVICES": "4"})
  assert code == 0 and "resumed from" in out + err, err[-2000:]
  one, moved = losses(tmp_path / "one"), losses(tmp_path / "moved")
  assert sorted(moved) == [1, 2, 3, 4]
  np.testing.assert_allclose([moved[s] for s in one], [one[s] for s in one], rtol=1e-5)


def test_nan_loss_stops_before_saving(tmp_path):
  """A learning rate of 1e38 blows the parameters up after step 1: the run stops at step 2
  with a clear message, and checkpoint 1 is the latest, intact and readable."""
  config = small_config(6, checkpoint_every=1, log_every=100)
  config.optimizer.update(learning_rate=1e38, schedule="constant", clip_norm=0.0)
  with pytest.raises(FloatingPointError, match=r"step 2: the loss is nan.*\(step 1\) is intact"):
    train.train(config, str(tmp_path), log=lambda line: None)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  abstract, _, _ = step.init_state(train.build(config), jax.random.key(0))
  params = checkpoint.load_params(str(tmp_path), abstract["params"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_full_disk_during_save_keeps_the_last_checkpoint(tmp_path):
  """Files capped at 64 KB (as a full disk would fail the write) while step 4 is saved: a
  CheckpointError names the intact step 2, and the next run resumes from it."""
  config = small_config(2, checkpoint_every=2)
  train.train(config, str(tmp_path), log=lambda line: None)
  config.train.steps = 4
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
  try:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, old_limit[1]))
    with pytest.raises(train.CheckpointError, match=r"\(step 2\) is intact"):
      train.train(config, str(tmp_path), log=lambda line: None)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
  lines = []
  train.train(config, str(tmp_path), log=lines.append)
  assert any("resumed from" in line and "step 2" in line for line in lines), lines
  assert "4" in os.listdir(tmp_path / "checkpoints")


def test_unwritable_workdir_is_refused_before_work(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="cannot be created"):
    train.train(small_config(1), str(blocker / "run"), log=lambda line: None)


def test_init_from_a_run_or_a_model_checkpoint(tmp_path):
  """Fine-tuning starts from another run's latest parameters or from a model checkpoint
  (what tools/convert_hf.py writes): its step-0 eval loss is the source's final one."""
  config = small_config(3, checkpoint_every=3, eval_every=3)
  source = train.train(config, str(tmp_path / "source"), log=lambda line: None)
  final = source.history[-1]["eval/loss"]
  checkpoint.save_model(str(tmp_path / "model"), source.setup.model, source.params)
  for origin in ("source", "model"):
    tuned = small_config(1, eval_every=1, init_from=str(tmp_path / origin))
    tuned.optimizer.learning_rate = 1e-4
    result = train.train(tuned, str(tmp_path / f"from_{origin}"), log=lambda line: None)
    assert result.history[0]["step"] == 0
    np.testing.assert_allclose(result.history[0]["eval/loss"], final, rtol=1e-6)
  other = small_config(1, init_from=str(tmp_path / "source"))
  other.model.d_model = 64
  with pytest.raises(ValueError, match=r"does not fit this model.*"
                     r"layers_0/attn/key_kernel: \(128, 4, 32\) there, \(64, 4, 16\) here"):
    train.train(other, str(tmp_path / "other"), log=lambda line: None)


def test_runlocal_shrinks_a_big_variant_to_a_cpu_run(tmp_path):
  """runlocal keeps the family, objective and optimizer and shrinks the rest to a run that
  trains on CPU (here 4 steps: runlocal caps the steps at 20, and fewer stay fewer). T5 base:
  an encoder-decoder without max_seq_len; a GPT's shrink runs in train_test's runlocal log
  test."""
  config = experiment("t5", "base")
  config.runlocal = True
  config.train.steps = 4
  result = train.train(config, str(tmp_path), log=lambda line: None)
  run = result.setup.config
  assert run.model.family == config.model.family and run.model.d_model < config.model.d_model
  assert run.objective.name == config.objective.name
  assert run.optimizer.name == config.optimizer.name
  assert run.batch_size == 8 and run.objective.length <= 128
  assert result.history[-1]["step"] == 4 and np.isfinite(result.history[-1]["eval/loss"])
