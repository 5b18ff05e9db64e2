"""`train(config, workdir)`: the step loop with evals, metrics, checkpoints, resume and signals.

Checkpoints (Orbax, async) hold the train state and the data iterator's position, so a
restarted run continues with the very batches it would have seen. SIGTERM or SIGINT saves
the current step and returns; a NaN or Inf loss stops the run before it is ever saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from llmjax import data, metrics
from llmjax.train import trainer


def _check_workdir(workdir: str, config) -> None:
  """Writes config.json; refuses a workdir whose checkpoints belong to another model."""
  os.makedirs(workdir, exist_ok=True)
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
  for _ in range(setup.config.train.eval_batches):
    batch = next(it)
    sums = eval_step(params, trainer._global_batch(batch_shardings, batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
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


def train(config, workdir: str, *, log=print) -> Result:
  """Trains (or resumes) the experiment `config` in `workdir`."""
  workdir = os.path.abspath(workdir)
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
  history, pending, clock, timed_steps = [], [], 0.0, 0
  try:
    step = start
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
      if is_log:
        fetched = jax.device_get(pending)
        pending = []
        losses = [float(m["loss"]) for m in fetched]
        if not np.all(np.isfinite(losses)):
          raise FloatingPointError(
              f"the loss became {losses[-1]} by step {step}; stopped before saving it: the last "
              f"checkpoint ({manager.latest_step()}) is intact. Lower the learning rate or "
              f"check the data")
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
      if step % c.eval_every == 0 or step == c.steps:
        record.update(evaluate(setup, eval_fn, state["params"], batch_shardings))
      if record:
        writer.write(step, record)
        history.append({"step": step, **record})
        log(_line(step, c.steps, record))
      if manager.should_save(step) or step == c.steps or signals.received:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)),
                     force=True)
      if signals.received:
        log(f"{signals.received}: saved step {step} in {workdir}/checkpoints; stopping")
        break
    manager.wait_until_finished()
  finally:
    signals.restore()
    writer.close()
    manager.close()
    it.close()
  return Result(history, state["params"], setup)


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
