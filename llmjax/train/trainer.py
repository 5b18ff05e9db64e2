"""The training loop: config -> model, objective, data, mesh -> sharded steps, evals, checkpoints.

    setup = build(config)                 # everything a run needs, nothing run yet
    history = train(config, workdir)      # trains, resuming from workdir's last checkpoint

The train state ({"step", "params", "opt_state"}) is created already sharded: shapes come
from `jax.eval_shape`, shardings from the logical axis names, and the init is jitted with
those out_shardings. The step is jitted with in/out shardings and a donated state, and the
only host work per step is feeding the next batch: metrics stay on device until a log line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain.experimental as gx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llmjax import data, models, objectives
from llmjax import sharding as sh
from llmjax.train import optim


@dataclasses.dataclass
class Setup:
  """What `build` makes from a config."""
  config: ml_collections.ConfigDict
  model: nn.Module
  tokenizer: Any
  objective: objectives.Objective
  train_source: Any
  eval_source: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  local_batch_size: int


def _objective(config, tokenizer) -> objectives.Objective:
  o = config.objective
  if o.name not in objectives.OBJECTIVES:
    raise ValueError(f"objective.name={o.name!r}; expected one of {sorted(objectives.OBJECTIVES)}")
  kwargs = {"causal_lm": dict(add_bos=o.add_bos, add_eos=o.add_eos,
                              random_offset=o.random_offset),
            "prefix_lm": dict(add_bos=o.add_bos, add_eos=o.add_eos),
            "masked_lm": dict(rate=o.mask_rate, max_predictions=o.max_predictions,
                              whole_word=o.whole_word),
            "span_corruption": dict(noise_density=o.noise_density,
                                    mean_noise_span_length=o.mean_noise_span_length)}
  return objectives.OBJECTIVES[o.name](tokenizer, o.length, **kwargs.get(o.name, {}))


def build(config: ml_collections.ConfigDict) -> Setup:
  """Builds the run's parts and checks them against each other before any work is done."""
  model = models.model_from_dict(config.model.to_dict())
  spec = config.data.tokenizer
  if spec == "char":  # the characters of the corpus file
    if not os.path.isfile(config.data.path):
      raise ValueError(f"data.tokenizer='char' takes its characters from data.path, which must "
                       f"be one text file; got data.path={config.data.path!r}")
    spec = "char:" + config.data.path
  tokenizer = data.load_tokenizer(spec)
  objective = _objective(config, tokenizer)
  objective.check_model(model)
  source = data.sources.open_source(config.data.path, format=config.data.format,
                                    split=config.data.split, field=config.data.field)
  train_source, eval_source = data.split_source(
      source, config.data.validation_fraction, method=config.data.split_method, seed=config.seed)
  mesh = sh.make_mesh(tuple(config.mesh.shape))
  rules = _rules(config.mesh.rules)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % data_parallel:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the data-parallel size "
                     f"{data_parallel} (mesh {dict(mesh.shape)}: data x fsdp)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  shards = config.data.shards or jax.process_count()
  if shards % jax.process_count() or config.batch_size % shards:
    raise ValueError(f"data.shards={shards} must be a multiple of the {jax.process_count()} "
                     f"processes and divide batch_size={config.batch_size}")
  microbatches = config.optimizer.microbatches
  if microbatches < 1 or (config.batch_size // jax.process_count()) % microbatches:
    raise ValueError(f"optimizer.microbatches={microbatches} must divide the per-process batch "
                     f"{config.batch_size // jax.process_count()}")
  tx, schedule = optim.optimizer(config.optimizer, config.train.steps)
  return Setup(config, model, tokenizer, objective, train_source, eval_source, mesh, rules, tx,
               schedule, config.batch_size // jax.process_count())


def _rules(overrides: str | None) -> tuple:
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
  one process with `data.shards=2` sees the very batches of two processes.
  """
  c = setup.config.data
  shards, processes = c.shards or jax.process_count(), jax.process_count()
  rows, per_process = setup.config.batch_size // shards, shards // processes
  kwargs = dict(batch_size=rows, seed=setup.config.seed, packing=c.packing,
                worker_count=c.worker_count, prefetch=c.prefetch, shard_count=shards)
  if split == "train":
    source, kwargs = setup.train_source, dict(kwargs, shuffle_window=c.shuffle_window)
  else:
    source, kwargs = setup.eval_source, dict(kwargs, shuffle=False, num_epochs=1,
                                             pad_after_end=True)
  first = jax.process_index() * per_process
  parts = [data.make_pipeline(source, setup.tokenizer, setup.objective, shard_index=first + i,
                              **kwargs) for i in range(per_process)]
  if per_process == 1:
    return parts[0]
  return gx.ZipIterDataset(parts).map(_concat_rows)


def _concat_rows(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _batch_sharding(setup: Setup, batch) -> dict[str, NamedSharding]:
  spec = nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), setup.rules)
  return {k: NamedSharding(setup.mesh, P(spec[0])) for k in batch}


def _global_batch(shardings, local_batch):
  """The per-process numpy batch as one global array per key, split over the data axes."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local_batch.items()}


def init_state(setup: Setup, key):
  """(abstract state, state shardings, jitted init): the state is born sharded."""
  example = data.padding_batch(setup.objective, 1)

  def init(key):
    params = setup.objective.init(setup.model, {"params": key}, example)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": setup.tx.init(params)}

  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    boxed = jax.eval_shape(init, key)
  shardings = sh.logical_sharding(boxed, setup.mesh, setup.rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  init_fn = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)
  return abstract, shardings, init_fn


def _loss_sums(setup: Setup, params, batch, dropout_key):
  """Summed loss and metric sums of one (micro)batch."""
  o, train_cfg = setup.config.objective, setup.model.cfg
  kwargs = {}
  if train_cfg.dropout_rate > 0 and dropout_key is not None:
    kwargs = {"deterministic": False, "rngs": {"dropout": dropout_key}}
  logits = setup.objective.logits(setup.model, {"params": params}, batch, **kwargs)
  _, sums = setup.objective.loss(logits, batch, z_loss=o.z_loss,
                                 label_smoothing=o.label_smoothing)
  return sums["loss"], sums


def make_train_step(setup: Setup, state_shardings, batch_shardings):
  """The jitted step: microbatched gradients of the mean loss, clipping, the update."""
  microbatches = setup.config.optimizer.microbatches
  base_key = jax.random.key(setup.config.seed)
  grad_fn = jax.grad(lambda p, b, k: _loss_sums(setup, p, b, k), has_aux=True)

  def step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    params = state["params"]
    if microbatches == 1:
      grads, sums = grad_fn(params, batch, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

      def body(carry, i):
        grads, sums = grad_fn(params, jax.tree.map(lambda x: x[i], micro),
                              jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, key))
      (grads, sums), _ = jax.lax.scan(body, zeros, jnp.arange(microbatches))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)  # the gradient of the mean loss
    updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    segment_ids = batch["segment_ids" if "segment_ids" in batch else "encoder_segment_ids"]
    out = {"loss": sums["loss"] / weight, "nll": sums["nll"] / weight,
           "accuracy": sums["correct"] / weight, "tokens": jnp.sum(segment_ids > 0),
           "grad_norm": optax.tree.norm(grads),
           "learning_rate": setup.schedule(state["step"])}
    return new_state, out

  return _in_mesh(setup, jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                                 out_shardings=(state_shardings, None), donate_argnums=0))


def _in_mesh(setup: Setup, fn):
  """`fn` traced and run under the mesh and rules: activation constraints by logical name
  apply, and the attention kernel finds the mesh to run per shard."""
  def run(*args):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return fn(*args)
  return run


def make_eval_step(setup: Setup, params_shardings, batch_shardings):
  def step(params, batch):
    _, sums = _loss_sums(setup, params, batch, None)
    return sums
  return _in_mesh(setup, jax.jit(step, in_shardings=(params_shardings, batch_shardings)))
