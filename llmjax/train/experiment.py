"""An experiment config made into the parts of a run: model, tokenizer, objective, data, mesh.

`build(config)` makes a `Setup`, `make_pipeline(setup, split)` its batches. `Setup` is a
`step.Parts` (what the steps need) plus what the loop needs: the config, the tokenizer, the train
and eval sources and this process's share of the batch. Every check that can fail on a user's config
runs here, before a parameter is initialized.
"""

import dataclasses
import json
from typing import Any

import grain.experimental as gx
import jax
import ml_collections
import numpy as np

from llmjax import checkpoint, data, models, objectives, peft
from llmjax import sharding as sh
from llmjax.train import config as config_lib
from llmjax.train import optim, step


@dataclasses.dataclass(kw_only=True)
class Setup(step.Parts):
  """What `build` makes from a config."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  train_source: Any
  eval_source: Any
  local_batch_size: int
  notes: tuple[str, ...] = ()  # what the run should log about its data


def build(config: ml_collections.ConfigDict) -> Setup:
  """Builds the run's parts and checks them against each other before any work is done."""
  config_lib.validate(config)
  data.sources.check_path(config.data.path)
  # With `lora.rank` set, LoRA adapters on the frozen base: init_from's, or without it the
  # seed's initialization (a smoke run's: never saved, a resumed run makes it again).
  model = peft.from_config(models.model_from_dict(config.model.to_dict()), config.get("lora"))
  tokenizer = data.load_tokenizer(checkpoint.tokenizer_spec(config))
  objective = objectives.from_config(config.objective, tokenizer,
                                     architecture=getattr(model, "ARCHITECTURE", None))
  objective.check_model(model)
  # Fine-tuning objectives read whole records, each checked as the files are opened.
  open_source = lambda path: data.sources.open_source(
      path, format=config.data.format, split=config.data.split, field=config.data.field,
      check_record=getattr(objective, "check_record", None))
  train_source = open_source(config.data.path)
  if config.data.eval_path:
    data.sources.check_path(config.data.eval_path, "data.eval_path")
    eval_source = open_source(config.data.eval_path)
  else:
    train_source, eval_source = data.split_source(
        train_source, config.data.validation_fraction, method=config.data.split_method,
        seed=config.seed)
  check_source = getattr(objective, "check_source", None)
  notes = tuple(filter(None, [check_source and check_source(train_source)]))
  mesh = sh.make_mesh(tuple(config.mesh.shape))
  data_parallel, procs = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
  if config.batch_size % data_parallel:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the data-parallel size "
                     f"{data_parallel} (mesh {dict(mesh.shape)}: data x fsdp)")
  if config.batch_size % procs:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {procs} processes")
  shards, local = config.data.shards or procs, config.batch_size // procs
  if shards % procs or config.batch_size % shards:
    raise ValueError(f"data.shards={shards} must be a multiple of the {procs} processes and "
                     f"divide batch_size={config.batch_size}")
  if (config.data.examples_per_batch or 0) % shards:
    raise ValueError(f"data.examples_per_batch={config.data.examples_per_batch} is not divisible "
                     f"by the {shards} data shards (data.shards, default: one per process)")
  microbatches = config.optimizer.microbatches
  if microbatches < 1 or local % microbatches:
    raise ValueError(f"optimizer.microbatches={microbatches} must divide the per-process batch "
                     f"{local}")
  tx, schedule = optim.optimizer(config.optimizer,
                                 config.optimizer.decay_steps or config.train.steps)
  return Setup(model=model, objective=objective, tx=tx, mesh=mesh, rules=rules(config.mesh.rules),
               schedule=schedule, microbatches=microbatches, seed=config.seed,
               dropout=getattr(model.cfg, "dropout_rate", 0) > 0, config=config,
               tokenizer=tokenizer, train_source=train_source, eval_source=eval_source,
               local_batch_size=local, trainable=peft.trainable(model), notes=notes)


def rules(overrides: str | None) -> tuple:
  """sharding.RULES with some logical names mapped elsewhere: `mesh.rules` is a JSON object
  such as '{"embed": null, "batch": ["data", "fsdp"]}' (null: not sharded)."""
  if not overrides:
    return sh.RULES
  try:
    table = json.loads(overrides)
  except json.JSONDecodeError as e:
    raise ValueError(f"mesh.rules={overrides!r} is not JSON ({e}); expected an object such as "
                     f'{{"embed": null, "mlp": "tensor"}}') from None
  names = [name for name, _ in sh.RULES]
  if not isinstance(table, dict):
    raise ValueError(f"mesh.rules={overrides!r} must be a JSON object of logical name -> axes")
  for name, axes in table.items():
    if name not in names:
      raise ValueError(f"mesh.rules: unknown logical axis {name!r}; expected one of {names}")
    for axis in [axes] if axes is None or isinstance(axes, str) else axes:
      if axis is not None and axis not in sh.MESH_AXES:
        raise ValueError(f"mesh.rules: {name!r} -> {axis!r} is not a mesh axis {sh.MESH_AXES}")
  return tuple((name, tuple(table[name]) if isinstance(table.get(name), list) else
                table[name]) if name in table else (name, axes) for name, axes in sh.RULES)


def make_pipeline(setup: Setup, split: str):
  """This process's batches of the train split (forever) or the eval split (once, in order).
  The documents are cut into `data.shards` shards (default: one per process), each with its
  own pipeline making batch_size / shards rows of every global batch; a process reads its
  run of consecutive shards. The global batches are thus a function of the config alone:
  one process with `data.shards=2` sees the very batches of two processes."""
  c = setup.config.data
  shards, processes = c.shards or jax.process_count(), jax.process_count()
  rows, per_process = setup.config.batch_size // shards, shards // processes
  kwargs = dict(batch_size=rows, seed=setup.config.seed, packing=c.packing,
                worker_count=c.worker_count, prefetch=c.prefetch, shard_count=shards)
  if split == "train":
    source, kwargs = setup.train_source, dict(kwargs, shuffle_window=c.shuffle_window)
    if c.examples_per_batch:  # a batch size in examples: each shard makes its share
      kwargs["examples_per_batch"] = c.examples_per_batch // shards
  else:
    source, kwargs = setup.eval_source, dict(kwargs, shuffle=False, num_epochs=1,
                                             pad_after_end=True)
  first = jax.process_index() * per_process
  objective = setup.objective if split == "train" else setup.objective.for_eval()
  parts = [data.make_pipeline(source, setup.tokenizer, objective, shard_index=first + i,
                              **kwargs) for i in range(per_process)]
  if per_process == 1:
    return parts[0]
  return gx.ZipIterDataset(parts).map(
      lambda batches: {k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
