"""The training step: a sharded train state, the jitted train and eval steps, batch placement.

Nothing here reads a config: the steps take a `Parts` (a model, an objective, an optax
optimizer, a mesh and its logical-axis rules), so a custom module trains as ours do (README.md,
"Training your own model": the model contract and a whole loop). Parameters with logical axis
names (see llmjax/sharding.py) are sharded by `rules`; others are replicated. The state
({"step", "params", "opt_state"}) is born sharded, and the step's metrics stay on device until
the caller fetches them. With `trainable` (LoRA: see llmjax/peft.py) the state's "params" are
the trained leaves only and "frozen" holds the rest: no gradient or optimizer state exists for
a frozen leaf, and the step hands it back untouched.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llmjax import data, peft
from llmjax import sharding as sh


@dataclasses.dataclass
class Parts:
  """What the steps need. `schedule` (step -> learning rate) is only reported in the metrics;
  `microbatches` splits each batch for gradient accumulation; `dropout` turns the model's
  dropout on in training, drawn from `seed` and the step; `trainable(path)`, if set, picks the
  parameters that train (the rest are frozen)."""
  model: nn.Module
  objective: Any
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple = sh.RULES
  schedule: optax.Schedule | None = None
  microbatches: int = 1
  dropout: bool = False
  seed: int = 0
  trainable: Any = None


def in_mesh(parts: Parts, fn):
  """`fn` run under the mesh and rules (for activation constraints and per-shard kernels)."""
  def run(*args):
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
      return fn(*args)
  return run


def init_state(parts: Parts, key):
  """(abstract state, state shardings, jitted init): the state is born sharded."""
  example = data.padding_batch(parts.objective, 1)

  def init(key):
    params, frozen = parts.objective.init(parts.model, {"params": key}, example)["params"], None
    if parts.trainable is not None:
      params, frozen = peft.split(params, parts.trainable)
    # The update computes in float32 (the gradient of the mean loss is), so the optimizer's
    # float state is float32 from the start: a bfloat16 model's state keeps its types across
    # steps, and its step compiles once.
    opt_state = jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
                             if jnp.issubdtype(x.dtype, jnp.floating) else x, parts.tx.init(params))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": opt_state} | ({} if frozen is None else {"frozen": frozen})

  boxed = in_mesh(parts, jax.eval_shape)(init, key)
  shardings = sh.logical_sharding(boxed, parts.mesh, parts.rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings, jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings,
                                      compiler_options=_init_options())


def _init_options() -> dict | None:
  """XLA:CPU compiles init (one random draw per parameter, run once) at LLVM -O1: 1.4 s
  sooner for shakespeare_char's model, the same bits (measured at 0.8M to 124M parameters).
  An optimization level in XLA_FLAGS wins."""
  if jax.default_backend() != "cpu" or "optimization_level" in os.environ.get("XLA_FLAGS", ""):
    return None
  return {"xla_backend_optimization_level": 1}


def batch_shardings(parts: Parts, batch) -> dict[str, NamedSharding]:
  """Each feature's rows split over the mesh axes the logical batch axis maps to."""
  spec = nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), parts.rules)
  return {k: NamedSharding(parts.mesh, P(spec[0])) for k in batch}


def global_batch(shardings, local_batch):
  """The per-process numpy batch as one global array per key, split over the data axes."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v)
          for k, v in local_batch.items()}


def loss_sums(parts: Parts, params, batch, dropout_key=None):
  """(summed loss, the objective's metric sums) of one (micro)batch."""
  kwargs = ({"deterministic": False, "rngs": {"dropout": dropout_key}}
            if parts.dropout and dropout_key is not None else {})
  logits = parts.objective.logits(parts.model, {"params": params}, batch, **kwargs)
  _, sums = parts.objective.loss(logits, batch)
  return sums["loss"], sums


def full_params(state) -> dict:
  """All the model's parameters of a train state: the trained and the frozen."""
  return peft.combine(state["params"], state["frozen"]) if "frozen" in state else state["params"]


def gradients(parts: Parts, state, batch, key):
  """(summed gradients of the trained parameters, metric sums) over the microbatches."""
  params = state["params"]
  grad_fn = jax.grad(lambda p, b, k: loss_sums(parts, full_params({**state, "params": p}), b, k),
                     has_aux=True)
  if parts.microbatches == 1:
    grads, sums = grad_fn(params, batch, key)
  else:
    micro = jax.tree.map(lambda x: x.reshape(parts.microbatches, -1, *x.shape[1:]), batch)

    def body(carry, i):
      grads, sums = grad_fn(params, jax.tree.map(lambda x: x[i], micro),
                            jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, key))
    (grads, sums), _ = jax.lax.scan(body, zeros, jnp.arange(parts.microbatches))
  return grads, sums


def train_step(parts: Parts, state, batch):
  """One update (not jitted): microbatched gradients of the mean loss, the optimizer's update.

  Returns (new state, metrics): the mean loss, nll and accuracy over the weighted tokens, the
  tokens in the batch, the gradient norm and (given a schedule) the step's learning rate."""
  key = jax.random.fold_in(jax.random.key(parts.seed), state["step"])
  params = state["params"]
  grads, sums = gradients(parts, state, batch, key)
  weight = jnp.maximum(sums["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)  # the gradient of the mean loss
  updates, opt_state = parts.tx.update(grads, state["opt_state"], params)
  new_state = {**state, "step": state["step"] + 1,
               "params": optax.apply_updates(params, updates), "opt_state": opt_state}
  segment_ids = batch["segment_ids" if "segment_ids" in batch else "encoder_segment_ids"]
  metrics = {"loss": sums["loss"] / weight, "nll": sums["nll"] / weight,
             "accuracy": sums["correct"] / weight, "tokens": jnp.sum(segment_ids > 0),
             "grad_norm": optax.tree.norm(grads)}
  if parts.schedule is not None:
    metrics["learning_rate"] = parts.schedule(state["step"])
  return new_state, metrics


def make_train_step(parts: Parts, state_shardings, batch_shardings):
  """`train_step` jitted with the state's and the batch's shardings, the state donated;
  `.lower(state, batch)` lowers it for abstract values (for an ahead-of-time compile)."""
  jitted = jax.jit(lambda state, batch: train_step(parts, state, batch),
                   in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)
  run = in_mesh(parts, jitted)
  run.lower = in_mesh(parts, jitted.lower)
  return run


def abstract_batch(parts: Parts, shardings, batch_size: int) -> dict:
  """The global batch's shapes, dtypes and shardings, as `global_batch` makes it."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
          for k, v in data.padding_batch(parts.objective, batch_size).items()}


def eval_step(parts: Parts, params, batch):
  """The objective's metric sums (loss, nll, correct, weight) of `batch`, dropout off."""
  return loss_sums(parts, params, batch)[1]


def make_eval_step(parts: Parts, params_shardings, batch_shardings):
  """`eval_step` jitted with the parameters' and the batch's shardings; `.lower(params, batch)`
  as `make_train_step`'s."""
  jitted = jax.jit(lambda params, batch: eval_step(parts, params, batch),
                   in_shardings=(params_shardings, batch_shardings))
  run = in_mesh(parts, jitted)
  run.lower = in_mesh(parts, jitted.lower)
  return run
