"""`train(config, workdir)`: the step loop with evals, metrics, checkpoints, resume and signals.

Checkpoints (Orbax, async) hold the train state and the data iterator's position, so a
restarted run continues with the very batches it would have seen. SIGTERM or SIGINT saves
the current step and returns; a NaN or Inf loss stops the run before it is ever saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llmjax import checkpoint, data, metrics
from llmjax.train import trainer
from llmjax.train.config import shrink_for_cpu


def _check_workdir(workdir: str, config) -> None:
  """Writes config.json; refuses a workdir whose checkpoints belong to another model."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir!r} is not writable")
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    with open(path) as f:
      saved = json.load(f)
    ours = json.loads(config.to_json())
    differ = sorted(k for k in set(saved["model"]) | set(ours["model"])
                    if saved["model"].get(k) != ours["model"].get(k))
    if differ:
      raise ValueError(f"{workdir} holds checkpoints of a different model (model fields "
                       + ", ".join(f"{k}: {saved['model'].get(k)!r} there, "
                                   f"{ours['model'].get(k)!r} here" for k in differ)
                       + "); use a new --workdir or the same model config")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(config.to_json(indent=1))


def evaluate(setup, eval_step, params, batch_shardings) -> dict[str, float]:
  """Loss, accuracy and perplexity of the objective's targets over the eval batches."""
  it = iter(trainer.make_pipeline(setup, "eval"))
  totals = None
  for i in range(setup.config.train.eval_batches):
    batch = next(it)
    sums = eval_step(params, trainer._global_batch(batch_shardings, batch))
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


@dataclasses.dataclass
class Result:
  """What a run leaves in memory: its metric records, final parameters and parts."""
  history: list[dict]
  params: Any
  setup: trainer.Setup


def _print(line: str) -> None:
  print(line, flush=True)


def train(config, workdir: str, *, log=_print) -> Result:
  """Trains (or resumes) the experiment `config` in `workdir`."""
  workdir = os.path.abspath(workdir)
  if config.runlocal:
    config = shrink_for_cpu(config)
    log("runlocal: shrunk to a CPU smoke run of the same family, objective and optimizer")
  setup = trainer.build(config)
  _check_workdir(workdir, config)
  abstract, state_shardings, init_fn = trainer.init_state(setup, jax.random.key(config.seed))
  it = iter(trainer.make_pipeline(setup, "train"))
  example = data.padding_batch(setup.objective, setup.local_batch_size)
  batch_shardings = trainer._batch_sharding(setup, example)
  step_fn = trainer.make_train_step(setup, state_shardings, batch_shardings)
  eval_fn = trainer.make_eval_step(setup, state_shardings["params"], batch_shardings)

  c = config.train
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(save_interval_steps=c.checkpoint_every,
                                           max_to_keep=c.keep_checkpoints,
                                           enable_async_checkpointing=True))
  start = manager.latest_step()
  if start is not None:
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(it)))
    state = restored["state"]
    log(f"resumed from {workdir}/checkpoints at step {start}")
  else:
    start, state = 0, init_fn(jax.random.key(config.seed))
    if c.init_from:  # fine-tuning: the optimizer starts afresh, the parameters do not
      state["params"] = checkpoint.load_params(c.init_from, abstract["params"])
      log(f"parameters from {c.init_from}")
  params = jax.tree.leaves(state["params"])
  num_params = sum(x.size for x in params)
  peak, peak_source = metrics.peak_flops()
  flops_per_token = metrics.flops_per_token(num_params, 0, setup.model.cfg.num_layers,
                                            config.objective.length, setup.model.cfg.d_model)
  log(f"{type(setup.model).__name__} {num_params:,} params, {setup.objective!r}, "
      f"{setup.train_source}, mesh {dict(setup.mesh.shape)}, peak {peak:.3g} FLOP/s "
      f"({peak_source})")

  writer = metrics.MetricWriter(workdir)
  signals = _Signals()
  history, pending, checked, clock, timed_steps = [], [], [], 0.0, 0
  step = start
  try:
    if step == 0 and c.eval_every:  # where the eval loss starts from
      record = evaluate(setup, eval_fn, state["params"], batch_shardings)
      writer.write(0, record)
      history.append({"step": 0, **record})
      log(_line(0, c.steps, record))
    while step < c.steps:
      batch = trainer._global_batch(batch_shardings, next(it))
      tic = time.perf_counter()
      state, step_metrics = step_fn(state, batch)
      pending.append(step_metrics)
      step += 1
      is_log = step % c.log_every == 0 or step == c.steps
      if is_log or step == start + 1:
        jax.block_until_ready(step_metrics)
      if step > start + 1:  # the first step compiles: keep it off the clock
        clock, timed_steps = clock + time.perf_counter() - tic, timed_steps + 1
      record = {}
      will_save = manager.should_save(step) or step == c.steps or signals.received
      if will_save or is_log:  # nothing unchecked is ever saved
        checked += _check_finite(jax.device_get(pending[len(checked):]),
                                 step - len(pending) + len(checked), manager)
      if is_log:
        fetched, pending, checked = checked, [], []
        losses = [float(m["loss"]) for m in fetched]
        tokens = sum(float(m["tokens"]) for m in fetched)
        rate = (tokens / len(fetched)) * timed_steps / clock if clock else float("nan")
        record = {"train/loss": float(np.mean(losses)),
                  "train/nll": float(np.mean([float(m["nll"]) for m in fetched])),
                  "train/accuracy": float(np.mean([float(m["accuracy"]) for m in fetched])),
                  "train/grad_norm": float(fetched[-1]["grad_norm"]),
                  "train/learning_rate": float(fetched[-1]["learning_rate"]),
                  "train/tokens_per_sec": rate,
                  "train/step_time": clock / timed_steps if timed_steps else float("nan"),
                  "train/mfu": rate * flops_per_token / peak}
        clock, timed_steps = 0.0, 0
      if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
        record.update(evaluate(setup, eval_fn, state["params"], batch_shardings))
      if record:
        writer.write(step, record)
        history.append({"step": step, **record})
        log(_line(step, c.steps, record))
      if will_save:
        with _saving(manager, step):
          manager.save(step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)),
                       force=True)
      if signals.received:
        log(f"{signals.received}: saved step {step} in {workdir}/checkpoints; stopping")
        break
    with _saving(manager, step):
      manager.wait_until_finished()
  finally:
    signals.restore()
    writer.close()
    it.close()
    with _saving(manager, step):
      manager.close()
  return Result(history, state["params"], setup)


class CheckpointError(RuntimeError):
  """Writing a checkpoint failed (disk full, no permission); the last complete one is intact."""


@contextlib.contextmanager
def _saving(manager, step: int):
  """Turns a failed (possibly earlier, asynchronous) save into a CheckpointError."""
  try:
    yield
  except Exception as e:  # Orbax reraises a background write's error at the next call
    message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise CheckpointError(
        f"writing a checkpoint in {manager.directory} failed by step {step}: {message}; the "
        f"last complete checkpoint (step {manager.latest_step()}) is intact") from e


def _check_finite(fetched: list[dict], first_step: int, manager) -> list[dict]:
  """`fetched` (the metrics of steps first_step+1, ...) if every loss and gradient is finite."""
  for i, m in enumerate(fetched):
    if not (np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))):
      raise FloatingPointError(
          f"step {first_step + i + 1}: the loss is {float(m['loss'])} and the gradient norm "
          f"{float(m['grad_norm'])}; stopped before saving: the last checkpoint (step "
          f"{manager.latest_step()}) is intact. Lower the learning rate or check the data")
  return fetched


def _line(step: int, total: int, record: dict) -> str:
  parts = [f"step {step:6d}/{total}"]
  if "train/loss" in record:
    rate = record["train/tokens_per_sec"]
    eta = (total - step) * record["train/step_time"]
    parts += [f"loss {record['train/loss']:.4f}", f"{rate / 1e3:.1f}k tok/s",
              f"MFU {record['train/mfu']:.1%}", f"ETA {eta:.0f} s"]
  if "eval/loss" in record:
    parts += [f"eval loss {record['eval/loss']:.4f}", f"acc {record['eval/accuracy']:.3f}"]
  return " | ".join(parts)
