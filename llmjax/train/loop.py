"""`train(config, workdir)`: the step loop with evals, metrics, checkpoints, resume and signals.

Checkpoints (Orbax, async) hold the train state and the data iterator's position, so a
restarted run continues with the very batches it would have seen. SIGTERM or SIGINT stops
the run after the step in flight: that step is saved, and the run returns. A NaN or Inf
loss stops the run before it is ever saved. The workdir may be local or `gs://`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llmjax import checkpoint, data, metrics, paths
from llmjax.train import experiment, step, workdir
from llmjax.train.config import shrink_for_cpu


@dataclasses.dataclass
class Result:
  """What a run leaves in memory: this segment's metric records, the final parameters, the
  parts, the step reached and the signal that stopped it early (None: it ran to the end)."""
  history: list[dict]
  params: Any
  setup: experiment.Setup
  step: int
  stopped: str | None = None


def _print(line: str) -> None:
  print(line, flush=True)


def train(config, workdir_path: str, *, log=_print) -> Result:
  """Trains (or resumes) the experiment `config` in `workdir_path` (a local path or gs://)."""
  if config.runlocal:
    config = shrink_for_cpu(config)
    log("runlocal: shrunk to a CPU smoke run of the same family, objective and optimizer")
  run_dir = paths.open_dir(workdir_path)
  config = workdir.reconcile(run_dir, config, log)
  setup = experiment.build(config)
  workdir.write_config(run_dir, config)
  abstract, state_shardings, init = step.init_state(setup, jax.random.key(config.seed))
  it = iter(experiment.make_pipeline(setup, "train"))
  shardings = step.batch_shardings(setup, data.padding_batch(setup.objective, 1))
  train_step = step.make_train_step(setup, state_shardings, shardings)
  eval_step = step.make_eval_step(setup, state_shardings["params"], shardings)
  c = config.train
  manager = _manager(run_dir, c)
  state, start = _restore_or_init(setup, manager, abstract, init, it, log)
  tracker = metrics.StepMetrics(*_flops(setup, state, log))
  writer, signals, history = metrics.MetricWriter(run_dir), _Signals(), []

  def report(at: int, record: dict) -> None:
    writer.write(at, record)
    history.append({"step": at, **record})
    log(metrics.format_line(at, c.steps, record))

  at = start
  try:
    if at == 0 and c.eval_every:  # where the eval loss starts from
      report(0, evaluate(setup, eval_step, state["params"], shardings))
    while at < c.steps and not signals.received:
      state, step_metrics = train_step(state, step.global_batch(shardings, next(it)))
      at += 1
      with _finite(manager):
        tracker.add(at, step_metrics)
        record = tracker.summary() if at % c.log_every == 0 or at == c.steps else {}
        with tracker.excluded():  # evals, log lines and saves are not step time
          if c.eval_every and (at % c.eval_every == 0 or at == c.steps):
            record.update(evaluate(setup, eval_step, state["params"], shardings))
          if record:
            report(at, record)
          if manager.should_save(at) or at == c.steps or signals.received:
            tracker.check()  # nothing unchecked is ever saved
            _save(manager, at, state, it)
    if signals.received:
      log(f"{signals.received}: saved step {at} in {run_dir}/checkpoints; stopping")
    with _saving(manager, at):
      manager.wait_until_finished()
  finally:
    signals.restore()
    writer.close()
    it.close()
    with _saving(manager, at):
      manager.close()
  return Result(history, state["params"], setup, at, signals.received)


def evaluate(setup, eval_step, params, shardings) -> dict[str, float]:
  """Loss, accuracy and perplexity of the objective's targets over the eval batches."""
  it = iter(experiment.make_pipeline(setup, "eval"))
  totals = None
  for i in range(setup.config.train.eval_batches):
    sums = eval_step(params, step.global_batch(shardings, next(it)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    # The split is read in order and padded after its end: once a whole global batch is
    # padding (the same answer on every process), the rest would be too.
    if i % 8 == 7 and float(sums["weight"]) == 0:
      break
  it.close()
  totals = jax.device_get(totals)
  weight = max(float(totals["weight"]), 1.0)
  loss = float(totals["nll"]) / weight
  return {"eval/loss": loss, "eval/accuracy": float(totals["correct"]) / weight,
          "eval/perplexity": float(np.exp(min(loss, 50.0))), "eval/tokens": float(totals["weight"])}


def _manager(run_dir, c) -> ocp.CheckpointManager:
  """Saves every `checkpoint_every` steps and when a preemption is announced (Orbax's
  default would also save the first step, a checkpoint no one resumes from)."""
  policies = ocp.checkpoint_managers
  policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(c.checkpoint_every),
                                   policies.PreemptionCheckpointingPolicy()])
  return ocp.CheckpointManager(
      run_dir / "checkpoints",
      options=ocp.CheckpointManagerOptions(save_decision_policy=policy,
                                           max_to_keep=c.keep_checkpoints,
                                           enable_async_checkpointing=True))


def _restore_or_init(setup, manager, abstract, init, it, log):
  """(state, step): the latest checkpoint's (the data iterator restored too), or a new state
  (with `train.init_from`'s parameters if set: fine-tuning starts a new optimizer)."""
  start = manager.latest_step()
  if start is not None:
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(it)))
    log(f"resumed from {manager.directory} at step {start}")
    return restored["state"], start
  state = init(jax.random.key(setup.config.seed))
  if setup.config.train.init_from:
    state["params"] = checkpoint.load_params(setup.config.train.init_from, abstract["params"])
    log(f"parameters from {setup.config.train.init_from}")
  return state, 0


def _flops(setup, state, log) -> tuple[float, float]:
  """(training FLOPs per token, the devices' peak FLOP/s), the model and peak logged."""
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  peak, source = metrics.peak_flops(setup.config.train.get("peak_flops"))
  log(f"{type(setup.model).__name__} {num_params:,} params, {setup.objective!r}, "
      f"{setup.train_source}, mesh {dict(setup.mesh.shape)}, peak {peak:.3g} FLOP/s ({source})")
  cfg = setup.model.cfg
  return metrics.flops_per_token(num_params, 0, cfg.num_layers, setup.config.objective.length,
                                 cfg.d_model), peak


def _save(manager, at: int, state, it) -> None:
  with _saving(manager, at):
    manager.save(at, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)), force=True)


class _Signals:
  """Remembers a SIGTERM / SIGINT so the loop can save and stop at a step boundary."""

  def __init__(self):
    self.received = None
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def restore(self):
    for s, handler in self._old.items():
      signal.signal(s, handler)


class CheckpointError(RuntimeError):
  """Writing a checkpoint failed (disk full, no permission); the last complete one is intact."""


@contextlib.contextmanager
def _saving(manager, at: int):
  """Turns a failed (possibly earlier, asynchronous) save into a CheckpointError."""
  try:
    yield
  except Exception as e:  # Orbax reraises a background write's error at the next call
    message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise CheckpointError(
        f"writing a checkpoint in {manager.directory} failed by step {at}: {message}; the "
        f"last complete checkpoint (step {manager.latest_step()}) is intact") from e


@contextlib.contextmanager
def _finite(manager):
  """A non-finite loss, as StepMetrics reports it, with what is left intact."""
  try:
    yield
  except FloatingPointError as e:
    raise FloatingPointError(
        f"{e}; stopped before saving: the last checkpoint (step {manager.latest_step()}) is "
        f"intact. Lower the learning rate or check the data") from None
