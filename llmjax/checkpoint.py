"""Model checkpoints with Orbax: parameters plus the model config that built them.

A model checkpoint directory holds `model.json` (the llmjax config, see
`models.config_to_dict`) and `params/` (an Orbax PyTree checkpoint). It is what
`tools/convert_hf.py` writes and what training can start from.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import linen as nn

from llmjax import models


def save_model(directory: str, model: nn.Module, params) -> None:
  """Writes `model`'s config and `params` under `directory` (which must not hold params yet)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "model.json"), "w") as f:
    json.dump(models.config_to_dict(model.cfg), f, indent=2)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params)


def load_model(directory: str, shardings=None) -> tuple[nn.Module, dict]:
  """(model, params) from `save_model`'s directory; `shardings` (a matching tree) places them."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, "model.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{directory!r} is not an llmjax model checkpoint: no model.json")
  with open(config_path) as f:
    model = models.model_from_dict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    tree = _stored_tree(ckptr, os.path.join(directory, "params"))
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    if shardings is not None:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    params = ckptr.restore(os.path.join(directory, "params"), abstract)
  return model, params


def _stored_tree(ckptr, directory: str):
  """The tree of array metadata (shapes, dtypes) of the checkpoint in `directory`."""
  meta = ckptr.metadata(directory)
  tree = getattr(meta, "item_metadata", meta)
  return getattr(tree, "tree", tree)


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def load_params(path: str, abstract_params) -> dict:
  """Parameters to start fine-tuning from, placed as `abstract_params` (ShapeDtypeStructs
  with shardings) says.

  `path` is a model checkpoint (`save_model`, `tools/convert_hf.py`) or the workdir of an
  llmjax run, whose latest checkpoint's parameters are read (not its optimizer state).
  Parameters that differ from `abstract_params` in names or shapes are an error naming them.
  """
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "model.json")):
    directory, prefix = os.path.join(path, "params"), None
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    with ocp.CheckpointManager(os.path.join(path, "checkpoints")) as manager:
      step = manager.latest_step()
    if step is None:
      raise ValueError(f"init_from={path!r}: the run's checkpoints directory holds no checkpoint")
    directory, prefix = os.path.join(path, "checkpoints", str(step), "state"), "params"
  else:
    raise ValueError(f"init_from={path!r} is neither a model checkpoint (model.json + params/) "
                     f"nor an llmjax workdir (checkpoints/)")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = _stored_tree(ckptr, directory)
    stored = _shapes(tree[prefix] if prefix else tree)
    wanted = _shapes(abstract_params)
    problems = [f"{k}: {stored[k]} there, {wanted[k]} here" for k in sorted(wanted)
                if k in stored and stored[k] != wanted[k]]
    problems += [f"{k}: missing there" for k in sorted(set(wanted) - set(stored))]
    problems += [f"{k}: not in this model" for k in sorted(set(stored) - set(wanted))]
    if problems:
      raise ValueError(f"init_from={path!r} does not fit this model ({len(problems)} "
                       f"parameters differ): " + "; ".join(problems[:6])
                       + ("; ..." if len(problems) > 6 else ""))
    item = {prefix: abstract_params} if prefix else abstract_params
    restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=prefix is not None))
  return restored[prefix] if prefix else restored
