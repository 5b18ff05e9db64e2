"""The run's config.json: checked against the config a resumed run brings, then written.

    run_dir = paths.open_dir(workdir)               # local or gs://
    config = workdir.reconcile(run_dir, config, log)
    workdir.write_config(run_dir, config)
"""

import json

import jax
import ml_collections
from etils import epath


def saved_config(run_dir: epath.Path) -> dict | None:
  """The config.json of a run that has checkpoints, else None."""
  file = run_dir / "config.json"
  if not (file.exists() and (run_dir / "checkpoints").exists()):
    return None
  return json.loads(file.read_text())


def reconcile(run_dir: epath.Path, config: ml_collections.ConfigDict, log) -> ml_collections.ConfigDict:
  """`config` checked against the run already in `run_dir`, if any: the same model; the schedule's
  length (`optimizer.decay_steps`) stays the first run's, and a change of train.steps is logged."""
  saved = saved_config(run_dir)
  if saved is None:
    return config
  ours = json.loads(config.to_json())
  differ = sorted(k for k in set(saved["model"]) | set(ours["model"])
                  if saved["model"].get(k) != ours["model"].get(k))
  if differ:
    raise ValueError(f"{run_dir} holds checkpoints of a different model (model fields "
                     + ", ".join(f"{k}: {saved['model'].get(k)!r} there, "
                                 f"{ours['model'].get(k)!r} here" for k in differ)
                     + "); use a new --workdir or the same model config")
  first = saved["optimizer"].get("decay_steps") or saved["train"]["steps"]
  asked = config.optimizer.decay_steps
  if asked is not None and asked != first:
    raise ValueError(f"optimizer.decay_steps={asked}, but the run in {run_dir} follows a "
                     f"schedule of {first} steps; changing it would change the learning rate "
                     f"of steps already taken: use a new --workdir or decay_steps={first}")
  if config.train.steps != saved["train"]["steps"] and asked is None:
    log(f"train.steps {saved['train']['steps']} -> {config.train.steps}: the learning-rate "
        f"schedule stays the first run's ({first} steps: optimizer.decay_steps={first}); "
        f"steps past it keep its final rate")
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  config.optimizer.decay_steps = first
  return config


def write_config(run_dir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """config.json, as the run trains (process 0 writes it)."""
  if jax.process_index() == 0:
    (run_dir / "config.json").write_text(config.to_json(indent=1))
