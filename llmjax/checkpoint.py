"""Loading what training and conversion write: parameters, the model that uses them, the tokenizer.

Two kinds of directory, local or gs://, hold parameters:

    model checkpoint   model.json (`models.config_to_dict`) + params/ (an Orbax PyTree
                       checkpoint), maybe a tokenizer: what `save_model` and convert_hf write;
                       quantized (llmjax.quant), also quant.json (its QuantConfig) and each
                       quantized weight as {"qvalue", "scale"} in params/
    llmjax workdir     config.json (the run's config) + checkpoints/<step>/state (the train
                       state {"step", "params", "opt_state"}, see `train.train`)
"""

import contextlib
import dataclasses
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn
from flax import traverse_util

from llmjax import data, models, paths, peft, quant

_KINDS = ("model checkpoint (model.json + params/)", "llmjax workdir (config.json + checkpoints/)")


def _read_json(file: epath.Path) -> dict:
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not JSON: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Found:
  """Where a path's parameters are: an Orbax PyTree checkpoint, under `key` if not at its root."""
  root: epath.Path
  params_dir: epath.Path
  key: str | None
  model_dict: dict | None  # the model's config_to_dict; None if the workdir lacks config.json
  run: dict | None = None  # a workdir's config.json


def _run_config(root: epath.Path) -> dict:
  config = _read_json(root / "config.json")
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise ValueError(f"{root}/config.json has no model section: not an llmjax workdir (a Hugging "
                     f"Face checkpoint? tools/convert_hf.py converts one)")
  return config


def _locate(path) -> _Found:
  root = paths.path(path)
  if not root.is_dir():
    problem = "is not a directory" if root.exists() else "does not exist"
    raise ValueError(f"{root} {problem}: expected a {_KINDS[0]} or an {_KINDS[1]}")
  if (root / "model.json").is_file():
    if not (root / "params").is_dir():
      raise ValueError(f"model checkpoint {root} has model.json but no params/")
    return _Found(root, root / "params", None, _read_json(root / "model.json"))
  has_config, has_checkpoints = (root / "config.json").is_file(), (root / "checkpoints").is_dir()
  if not (has_config or has_checkpoints):
    raise ValueError(f"{root} is neither a {_KINDS[0]} nor an {_KINDS[1]}")
  run = _run_config(root) if has_config else None
  step = None
  if has_checkpoints:
    with ocp.CheckpointManager(root / "checkpoints") as manager:
      step = manager.latest_step()  # complete checkpoints only
  if step is None:
    raise ValueError(f"workdir {root} holds no checkpoint yet")
  return _Found(root, root / "checkpoints" / str(step) / "state", "params",
                run and run["model"], run)


def _stored(found: _Found):
  """The tree of the stored parameters' metadata (shape, dtype)."""
  with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
    meta = handler.metadata(found.params_dir)
  tree = getattr(meta, "tree", meta)
  return tree[found.key] if found.key else tree


def _restore(found: _Found, abstract):
  """The stored parameters placed as `abstract` says; nothing else of the checkpoint is read."""
  item = {found.key: abstract} if found.key else abstract
  # The handler itself, not a Checkpointer: a workdir's state/ is one item of a step, whose
  # step metadata a Checkpointer would look for (and warn about) in the item's directory.
  with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
    restored = handler.restore(found.params_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return restored[found.key] if found.key else restored


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def save_model(directory: str, model: nn.Module, params) -> None:
  """Writes `model`'s config and `params` under `directory` (which must not hold params yet);
  a quantized model's values and scales as they are."""
  root = paths.path(directory)
  root.mkdir(parents=True, exist_ok=True)
  (root / "model.json").write_text(json.dumps(models.config_to_dict(model.cfg), indent=2))
  cfg = getattr(model, "quant", None)
  if cfg is not None:
    (root / "quant.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    params = quant.to_arrays(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / "params", nn.meta.unbox(params))


def load_model(path: str, shardings=None) -> tuple[nn.Module, dict]:
  """(model, params) of a model checkpoint or a workdir's latest: arrays in their stored dtypes,
  on one device unless `shardings` (a matching tree, or one for all) places them."""
  found = _locate(path)
  if found.model_dict is None:
    raise ValueError(f"workdir {found.root} has checkpoints but no config.json: its model is "
                     f"unknown")
  model = models.model_from_dict(found.model_dict)
  stored = _stored(found)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  one = shardings if isinstance(shardings, jax.sharding.Sharding) else None
  if one:
    shardings = jax.tree.map(lambda _: one, stored)
  abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                          stored, shardings)
  params = _restore(found, abstract)
  if (found.root / "quant.json").is_file():
    model = quant.wrap(model, quant.QuantConfig(**_read_json(found.root / "quant.json")))
    return model, quant.from_arrays(params, quant.abstract(model))
  lora = peft.from_config(model, (found.run or {}).get("lora"))
  if lora is model:
    return model, params
  # A LoRA run saves what it trained; the frozen base is its init_from's.
  init_from = found.run["train"].get("init_from")
  if not init_from:
    raise ValueError(f"{found.root} is a LoRA run on the seed's initialization (no "
                     f"train.init_from): its frozen base was never saved")
  base = load_model(init_from, one)[1]
  base = quant.fill(base, quant.abstract(lora)) if getattr(lora, "quant", None) else base  # QLoRA
  return lora, peft.combine(base, params)


def load_params(path: str, abstract_params, keep_new=None) -> dict:
  """The parameters of `path` (as `load_model`) placed as `abstract_params` (ShapeDtypeStructs
  with shardings) says; differing names or shapes are an error naming them. Fine-tuning passes
  `keep_new(name)`: the parameters it accepts may be missing there (new: left out of the
  result, for the caller's initialization), and parameters there but not here are dropped.
  Quantized weights in `abstract_params` (QLoRA's base) load float and quantize as they load."""
  found = _locate(path)
  if (found.root / "quant.json").is_file():
    raise ValueError(f"{found.root} is a quantized checkpoint: fine-tune (QLoRA included, which "
                     f"quantizes as it loads) from the float one")
  quantized, abstract_params = abstract_params, quant.float_view(abstract_params)
  stored, wanted = _shapes(_stored(found)), _shapes(abstract_params)
  new = {k for k in set(wanted) - set(stored) if keep_new and keep_new(k)}
  problems = [f"{k}: {stored[k]} there, {wanted[k]} here" for k in sorted(wanted)
              if k in stored and stored[k] != wanted[k]]
  problems += [f"{k}: missing there" for k in sorted(set(wanted) - set(stored) - new)]
  if not keep_new:
    problems += [f"{k}: not in this model" for k in sorted(set(stored) - set(wanted))]
  if problems:
    raise ValueError(f"{found.root} does not fit this model ({len(problems)} parameters differ): "
                     + "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
                     + (" (a classification head of another num_labels)" if any(
                         p.startswith("classifier/") for p in problems) else ""))
  flat = traverse_util.flatten_dict(abstract_params, sep="/")
  loaded = _restore(found, traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if k not in new}, sep="/"))
  return quant.fill(loaded, quantized) if quant.is_quantized(quantized) else loaded


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` trained with (its config.json)."""
  root = paths.path(workdir)
  if not (root / "config.json").is_file():
    raise ValueError(f"{root} is not an llmjax workdir: no config.json")
  return ml_collections.ConfigDict(_run_config(root))


def tokenizer_spec(config) -> str:
  """What `data.load_tokenizer` takes to rebuild a run's tokenizer from its config."""
  spec = config.data.tokenizer
  return "char:" + config.data.path if spec == "char" else spec  # the corpus's characters


def tokenizer_of(path: str) -> str:
  """What `data.load_tokenizer` takes to rebuild the tokenizer of a workdir (as its config.json
  says) or of a model checkpoint (its tokenizer_spec file, else the files beside it)."""
  return _tokenizer_source(path)[0]


def _tokenizer_source(path: str) -> tuple[str, str]:
  """(`tokenizer_of(path)`, which kind of directory `path` is, for messages)."""
  root = paths.path(path)
  if (root / "model.json").is_file():
    spec = root / "tokenizer_spec"  # a quantized run's (tools/quantize.py)
    return spec.read_text().strip() if spec.is_file() else str(root), f"model checkpoint {root}"
  if (root / "config.json").is_file():
    return tokenizer_spec(load_config(root)), f"workdir {root}"
  raise ValueError(f"{root} is neither a {_KINDS[0]} nor an {_KINDS[1]}")


def load_tokenizer(path: str):
  """The tokenizer of a workdir or a model checkpoint (see `tokenizer_of`)."""
  spec, what = _tokenizer_source(path)
  try:
    return data.load_tokenizer(spec)
  except (OSError, ValueError) as e:  # a relative data.path is read from the current directory
    raise ValueError(f"the tokenizer of {what} ({spec}) cannot be loaded: "
                     f"{paths.error_text(e, last=True)}") from None
