"""`train(config, workdir)`: the step loop with evals, metrics, checkpoints, resume and signals.

Checkpoints hold the train state, the data iterator's position and the metrics since the
last log line, so a restarted run sees the very batches and logs the very values. SIGTERM or
SIGINT stops the run after the step in flight, logged and saved (see llmjax/signals.py). A
NaN or Inf loss stops the run before it is ever saved. The workdir may be local or `gs://`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llmjax import checkpoint, data, evaluation, metrics, paths, peft, signals
from llmjax.train import checkpoints, experiment, lease, step, workdir
from llmjax.train.config import shrink_for_cpu


@dataclasses.dataclass
class Result:
  """What a run leaves in memory; `stopped`: the signal that stopped it early, if any."""
  history: list[dict]
  params: Any
  setup: experiment.Setup
  step: int
  stopped: str | None = None


def train(config, workdir_path: str, *, log=functools.partial(print, flush=True)) -> Result:
  """Trains (or resumes) the experiment `config` in `workdir_path` (a local path or gs://)."""
  if config.runlocal:
    config = shrink_for_cpu(config)
    log("runlocal: shrunk to a CPU smoke run of the same family, objective and optimizer")
  run_dir = paths.open_dir(workdir_path)
  with lease.hold(run_dir, log=log) as held:  # one run per workdir
    return _train(config, run_dir, held, log)


def _train(config, run_dir, held, log) -> Result:
  """The loop of `train`, in a workdir this run holds."""
  config = workdir.reconcile(run_dir, config, log)
  for spec in config.train.eval_tasks:  # a bad spec or a missing file stops before any work
    evaluation.tasks.parse(spec)
  setup = experiment.build(config)
  workdir.write_config(run_dir, config)
  abstract, state_shardings, init = step.init_state(setup, jax.random.key(config.seed))
  if setup.trainable:  # a LoRA target that matches nothing stops here
    peft.check_matched(setup.model, step.full_params(abstract))
  for note in setup.notes:
    log(note)
  it = iter(experiment.make_pipeline(setup, "train"))
  shardings = step.batch_shardings(setup, data.padding_batch(setup.objective, 1))
  train_step = step.make_train_step(setup, state_shardings, shardings)
  # The steps are traced here (tracing is not thread-safe: qwix's LoRA intercepts it) and
  # compiled in two threads (XLA lets go of the GIL), on a host with cores to spare while the
  # state is restored or initialized; on 2 cores, compiling beside init finished later than
  # one after the other (shakespeare_char's first step 14.2 s against 12.4).
  c = config.train
  batch = step.abstract_batch(setup, shardings, config.batch_size)
  eval_step = step.make_eval_step(setup, step.full_params(state_shardings), shardings)
  pool = concurrent.futures.ThreadPoolExecutor(2, "compile")
  # XLA:CPU's executables take 4-bit arrays packed, which CPU arrays are not (QLoRA's int4 or
  # nf4 base): such a state runs through the jitted function, compiled at its first call.
  aot = jax.default_backend() != "cpu" or not any(
      x.dtype in (jnp.int4, jnp.uint4) for x in jax.tree.leaves(abstract))
  compiled = lambda f, *args: f.lower(*args).compile if aot else lambda: f
  compiling = pool.submit(compiled(train_step, abstract, batch))
  if c.eval_every:
    eval_compiling = pool.submit(compiled(eval_step, step.full_params(abstract), batch))
  pool.shutdown(wait=(os.cpu_count() or 1) <= 2)
  ckpts = checkpoints.Checkpoints(run_dir / "checkpoints", c.checkpoint_every,
                                  c.keep_checkpoints, log=log)
  state, start, window = _restore_or_init(setup, ckpts, abstract, init, it, log)
  if c.eval_every:
    eval_step = eval_compiling.result()
  train_step = compiling.result()  # before the CPU's peak is measured, if it is
  tracker = metrics.StepMetrics(*_flops(setup, state, log), window=window)
  writer, history = metrics.MetricWriter(run_dir), []
  signals.clear()

  def report(at: int, record: dict) -> None:
    writer.write(at, record)
    history.append({"step": at, **record})
    log(metrics.format_line(at, c.steps, record))

  at, stop = start, None
  try:
    if at == 0 and c.eval_every and c.eval_on_start:  # where the eval loss starts from
      report(0, evaluate(setup, eval_step, step.full_params(state), shardings))
    while at < c.steps and not stop:
      state, step_metrics = train_step(state, step.global_batch(shardings, next(it)))
      at += 1
      signals.deferred()  # from the first step on (compiled now), a signal stops at a step
      # Read once a step: one that lands after this step's save was decided stops the next.
      stop = signals.received()
      with _finite(ckpts):
        tracker.add(at, step_metrics)
        record = tracker.summary(keep=bool(stop)) if (
            at % c.log_every == 0 or at == c.steps or stop) else {}
        with tracker.excluded():  # evals, log lines and saves are not step time
          if c.eval_every and (at % c.eval_every == 0 or at == c.steps):
            record.update(evaluate(setup, eval_step, step.full_params(state), shardings))
          if record:
            report(at, record)
          if ckpts.should_save(at) or at == c.steps or stop:
            tracker.check()  # nothing unchecked is ever saved
            held.check()  # nor by a run that lost the workdir to another
            ckpts.save(at, _saved(state), it, tracker.window())
    if stop:
      log(f"{stop}: saved step {at} in {run_dir}/checkpoints; stopping")
    ckpts.wait(at)
  except BaseException:
    _close_quietly(log, writer.close, it.close, lambda: ckpts.close(at))
    raise
  finally:
    signals.deferred(False)
  writer.close()
  it.close()
  ckpts.close(at)
  return Result(history, step.full_params(state), setup, at, stop)


def evaluate(setup, eval_step, params, shardings) -> dict[str, float]:
  """Loss, accuracy and perplexity of the objective's targets over the eval batches, and the
  metrics of train.eval_tasks."""
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
  record = {"eval/loss": loss, "eval/accuracy": float(totals["correct"]) / weight,
            "eval/perplexity": float(np.exp(min(loss, 50.0))),
            "eval/tokens": float(totals["weight"])}
  extra = getattr(setup.objective, "metrics", None)  # e.g. classification's F1
  record.update({f"eval/{k}": v for k, v in (extra(totals) if extra else {}).items()})
  for spec in setup.config.train.eval_tasks:  # train.eval_tasks, as eval/<task>/<metric>
    name, scores = evaluation.run_task(spec, setup.model, params, setup.tokenizer,
                                       batch_size=setup.config.batch_size)
    record.update({f"eval/{name}/{k}": float(v) for k, v in scores.items()})
  return record


def _restore_or_init(setup, ckpts, abstract, init, it, log):
  """(state, step, log window) of the latest checkpoint (`it` restored too), or a new state
  (with `train.init_from`'s parameters if set: fine-tuning starts a new optimizer)."""
  restored, start, window = ckpts.restore(_saved(abstract), it)
  lora = "frozen" in abstract  # its frozen parameters are never saved: init_from has them
  if restored is not None and not lora:
    log(f"resumed from {ckpts.directory} at step {start}")
    return restored, start, window
  state = init(jax.random.key(setup.config.seed))
  if setup.config.train.init_from:
    # What the checkpoint lacks and fine-tuning adds (adapters, a new head) keeps its init.
    loaded = checkpoint.load_params(setup.config.train.init_from, step.full_params(abstract),
                                    keep_new=_new_leaf)
    params = peft.combine(step.full_params(state), loaded)
    new = set(_paths(params)) - set(_paths(loaded))
    frozen_new = sorted(k for k in new if setup.trainable and not setup.trainable(k))
    if frozen_new:  # it would stay at its random initialization, and never be saved
      raise ValueError(f"{frozen_new[0]} is not in train.init_from and LoRA would freeze it at "
                       f"its initialization; train it: lora.train='(classifier|"
                       f"{frozen_new[0].split('/')[0]})/.*'")
    if lora:
      state["params"], state["frozen"] = peft.split(params, setup.trainable)
    else:
      state["params"] = params
    log(f"parameters from {setup.config.train.init_from}")
  if restored is not None:
    log(f"resumed from {ckpts.directory} at step {start}")
    return restored | {"frozen": state["frozen"]}, start, window
  return state, 0, None


def _new_leaf(path: str) -> bool:
  """Parameters fine-tuning adds to a pre-trained model: LoRA adapters, a classification head
  (and BERT's pooler under it, if the pre-trained model had none)."""
  return peft.is_adapter(path) or path.startswith(("classifier/", "pooler_dense/"))


def _paths(tree) -> list[str]:
  return list(traverse_util.flatten_dict(tree, sep="/"))


def _saved(state: dict) -> dict:
  """What a checkpoint holds of a train state: the frozen parameters come from init_from."""
  return {k: v for k, v in state.items() if k != "frozen"}


def _flops(setup, state, log) -> tuple[float, float]:
  """(training FLOPs per token, the devices' peak FLOP/s), the model and peak logged."""
  num_params = sum(x.size for x in jax.tree.leaves(step.full_params(state)))
  trained = (f" ({sum(x.size for x in jax.tree.leaves(state['params'])):,} trained)"
             if "frozen" in state else "")
  peak, source = metrics.peak_flops(setup.config.train.get("peak_flops"), setup.model.cfg.dtype)
  log(f"{type(setup.model).__name__} {num_params:,} params{trained}, {setup.objective!r}, "
      f"{setup.train_source}, mesh {dict(setup.mesh.shape)}, peak {peak:.3g} FLOP/s ({source})")
  cfg = setup.model.cfg
  # A classifier multiplies by no vocabulary: its token table is a lookup, no FLOPs.
  lookup = cfg.vocab_size * cfg.d_model if getattr(cfg, "head", None) == "classify" else 0
  return metrics.flops_per_token(num_params, lookup, cfg.num_layers,
                                 setup.config.objective.length, cfg.d_model), peak


def _close_quietly(log, *closers) -> None:
  """Runs every closer, logging their errors: the one that stopped the run is the one to see."""
  for close in closers:
    try:
      close()
    except Exception as e:  # a full disk fails the metrics file too, say
      log(f"while stopping: {paths.error_line(e)}")


@contextlib.contextmanager
def _finite(ckpts):
  """A non-finite loss, as StepMetrics reports it, with what is left intact."""
  try:
    yield
  except FloatingPointError as e:
    raise FloatingPointError(
        f"{e}; stopped before saving: the last checkpoint (step {ckpts.latest_step()}) is "
        f"intact. Lower the learning rate or check the data") from None
