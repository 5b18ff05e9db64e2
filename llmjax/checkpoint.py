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
    meta = ckptr.metadata(os.path.join(directory, "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    if shardings is not None:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    params = ckptr.restore(os.path.join(directory, "params"), abstract)
  return model, params
