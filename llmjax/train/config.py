"""The experiment config: one ml_collections ConfigDict, every field overridable from flags.

Experiments (`experiments/*.py`) start from `base_config()` and change what they need;
`--config.optimizer.learning_rate=3e-4` overrides a field, and a misspelled key is refused
with the nearest valid name. Every field of the model's dataclass is present, so any model
field can be overridden too.

    seed          everything random: parameters, data order, dropout
    model         family + every field of that family's config dataclass
    objective     name (causal_lm | prefix_lm | masked_lm | span_corruption; fine-tuning:
                  classification | sft | seq2seq), length, knobs
    data          source path ("builtin" or files; eval_path: its own eval files, else a split
                  of path), tokenizer ("byte", "char" = the characters of data.path, a
                  SentencePiece .model, a tokenizer.json), split, packing, workers, shards
                  (default one per process; fixed, the batches don't depend on the hosts)
    batch_size    global batch (rows across all processes)
    optimizer     adamw | adafactor, schedule, clipping, decay, microbatches, z-loss, smoothing
    mesh          shape over (data, fsdp, tensor), -1 = the rest; rules override
    lora          rank (None: full fine-tuning), alpha, dropout, targets, rslora, train: LoRA
                  adapters on the frozen `train.init_from` model (see llmjax/peft.py);
                  quantize: nf4 | int8 | int4 quantizes that base (QLoRA)
    train         steps, intervals for logging / eval (and one at step 0: eval_on_start) /
                  checkpoints, init_from
    runlocal      True: shrink the experiment to a CPU smoke run (see `shrink_for_cpu`)

`load_experiment("experiments/gpt.py:tiny")` is what `--config=` names, `override` sets one
field from its command-line text, and `validate` checks every range before a run is built:
each raises a one-line ValueError naming the field. `train.steps=0` is a run: it evaluates
(and samples from) the initial or `init_from` parameters without a step of training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import os

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import tuple_parser

from llmjax import models, objectives
from llmjax.data import pipeline, sources
from llmjax.train import optim


def _field_type(annotation) -> type:
  """int / float / str / bool from a dataclass annotation such as "int | None"."""
  text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
  for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
    if name in text:
      return kind
  return object


def model_config(family: str, size: str, **overrides) -> ml_collections.ConfigDict:
  """A ConfigDict of every field of `family`'s config at `size`; None fields are typed placeholders."""
  if family not in models.FAMILIES:
    raise ValueError(f"unknown model family {family!r}; expected one of {sorted(models.FAMILIES)}")
  cfg_cls, _ = models.FAMILIES[family]
  cfg = cfg_cls.from_size(size, **overrides)
  out = ml_collections.ConfigDict({"family": family})
  for field in dataclasses.fields(cfg_cls):
    value = getattr(cfg, field.name)
    out[field.name] = config_dict.placeholder(_field_type(field.type)) if value is None else value
  return out


def objective_config(name: str = "causal_lm", length: int = 128) -> ml_collections.ConfigDict:
  """Which objective, its row length (span corruption: the encoder's) and every objective's
  settings (`objectives.settings()`)."""
  out = ml_collections.ConfigDict({"name": name, "length": length})
  for key, (default, annotation) in objectives.settings().items():
    out[key] = config_dict.placeholder(_field_type(annotation)) if default is None else default
  return out


def base_config() -> ml_collections.ConfigDict:
  """The defaults every experiment starts from: a tiny byte-level GPT on the built-in corpus."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("gpt", "tiny", vocab_size=384, d_model=128, num_layers=4, num_heads=4,
                         max_seq_len=128, dropout_rate=0.0)
  c.objective = objective_config("causal_lm", 128)
  c.data = ml_collections.ConfigDict({
      "path": "builtin", "format": config_dict.placeholder(str), "split": "paragraph",
      "field": "text", "tokenizer": "byte", "validation_fraction": 0.05,
      "split_method": "hash", "packing": "pack", "shuffle_window": 0,
      "eval_path": config_dict.placeholder(str),
      "examples_per_batch": config_dict.placeholder(int),
      "shards": config_dict.placeholder(int), "worker_count": 0, "prefetch": 2})
  c.batch_size = 8
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 2e-3, "schedule": "cosine", "warmup_steps": 50,
      "final_learning_rate": 2e-4, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.1,
      "clip_norm": 1.0, "microbatches": 1, "decay_steps": config_dict.placeholder(int)})
  c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1), "rules": config_dict.placeholder(str)})
  c.lora = ml_collections.ConfigDict({
      "rank": config_dict.placeholder(int), "alpha": 8.0, "dropout": 0.0, "rslora": False,
      "targets": config_dict.placeholder(str), "train": "classifier/.*",
      "quantize": config_dict.placeholder(str)})
  c.train = ml_collections.ConfigDict({
      "steps": 1000, "log_every": 50, "eval_every": 250, "eval_on_start": True,
      "eval_batches": 16, "checkpoint_every": 500, "keep_checkpoints": 3,
      "init_from": config_dict.placeholder(str), "sample_prompt": "def ", "sample_tokens": 200,
      "eval_tasks": ()})
  c.runlocal = False
  return c


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The default experiment (what `python -m llmjax.main` runs with no --config)."""
  if variant:
    raise ValueError(f"the default config has no variants, got {variant!r}")
  return base_config()


def shrink_for_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` as a CPU smoke run (`--config.runlocal=True`) of the same family, objective and
  optimizer."""
  c = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  length = min(c.objective.length, 128)
  kwargs = {"max_seq_len": length} if "max_seq_len" in c.model else {}
  kwargs.update({k: c.model[k] for k in ("head", "num_labels", "pooler") if k in c.model})
  c.model = model_config(c.model.family, "tiny", vocab_size=384,
                         dropout_rate=c.model.dropout_rate, **kwargs)
  c.objective.update(length=length, max_predictions=None)
  c.data.update(tokenizer="byte", shards=None, worker_count=0)
  if not hasattr(objectives.OBJECTIVES.get(c.objective.name), "check_record"):
    # Fine-tuning keeps its records (and eval_path); the rest read the built-in corpus.
    c.data.update(path="builtin", format=None, split="paragraph", split_method="hash",
                  validation_fraction=0.05, eval_path=None)
  c.batch_size = 8
  c.optimizer.update(warmup_steps=min(c.optimizer.warmup_steps, 5), microbatches=1)
  c.mesh.shape = (-1, 1, 1)
  c.train.update(steps=min(c.train.steps, 20), log_every=5, eval_every=20, eval_batches=2,
                 checkpoint_every=20, init_from=None, sample_tokens=min(c.train.sample_tokens, 50))
  c.runlocal = False
  return c


def load_experiment(spec: str | None = None) -> ml_collections.ConfigDict:
  """The config `--config=PATH[:variant]` names (None: the default), as ml_collections
  loads it; a missing file, a bad variant or a file without get_config() is a one-line error."""
  if spec is None:
    return get_config()
  path, colon, variant = spec.partition(":")
  if not path:
    raise ValueError(f"--config={spec!r} names no file; expected EXPERIMENT.py[:variant]")
  if os.path.isdir(path):
    raise ValueError(f"--config={path} is a directory; expected a file such as "
                     f"{os.path.join(path, 'gpt.py')}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={path} does not exist{_nearest_file(path)}")
  module_spec = importlib.util.spec_from_file_location("_experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"{path}:{e.lineno}: {e.msg}") from None
  get = getattr(module, "get_config", None)
  if not callable(get):
    raise ValueError(f"{path} defines no get_config()")
  args = (variant,) if colon else ()
  try:
    inspect.signature(get).bind(*args)
  except TypeError:
    raise ValueError(f"{path}: get_config() takes no variant, got {variant!r}") from None
  try:
    config = get(*args)
  except ValueError as e:  # an unknown variant, by the experiments' convention
    raise ValueError(f"{path}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config() returned a {type(config).__name__}, not a ConfigDict")
  return config


def _nearest_file(path: str) -> str:
  """'; did you mean DIR/NAME.py?' for a close name beside `path`, else what the folder holds."""
  folder = os.path.dirname(path) or "."
  names = (sorted(n for n in os.listdir(folder) if n.endswith(".py"))
           if os.path.isdir(folder) else [])
  stem = os.path.splitext(os.path.basename(path))[0]  # ".py" alone makes any two names close
  close = difflib.get_close_matches(stem, [n[:-3] for n in names], n=1)
  if close:
    return f"; did you mean {os.path.join(os.path.dirname(path), close[0] + '.py')}?"
  return f"; {folder}/ holds {', '.join(names)}" if names else ""


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field's dotted path, e.g. "optimizer.learning_rate"."""
  out = []
  for key, value in config.items():
    is_section = isinstance(value, ml_collections.ConfigDict)
    out += leaf_paths(value, f"{prefix}{key}.") if is_section else [f"{prefix}{key}"]
  return out


def field_type(config: ml_collections.ConfigDict, key: str) -> type:
  """The type of the field at dotted `key`; ValueError naming the nearest field if none."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    where = ".".join(parts[:i])
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"{key}: no such field; {where} is a field, not a section")
    if part not in node:
      close = difflib.get_close_matches(key, leaf_paths(config), n=1, cutoff=0.7)
      if close:
        raise ValueError(f"{key}: no such field; did you mean {close[0]}?")
      raise ValueError(f"{key}: no such field; {where or 'the config'} has "
                       f"{', '.join(node.keys())}")
    kind, node = node.get_type(part), node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise ValueError(f"{key} is a section, not a field; set one of {key}.{{"
                     f"{', '.join(node.keys())}}}")
  return kind


# How `--config.KEY=TEXT` reads TEXT for each field type: ml_collections' config_flags table.
_PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser(),
            str: flags.ArgumentParser(), tuple: tuple_parser.TupleParser()}
_EXPECTED = {int: "an int", float: "a number", bool: "true or false", str: "a string",
             tuple: "a tuple such as (-1,1,1)"}


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets the field `key` of `config` from command-line text as `--config.KEY=TEXT` does;
  ValueError for a field that doesn't exist (naming the nearest) or text it can't hold."""
  kind = field_type(config, key)
  if kind not in _PARSERS:
    raise ValueError(f"{key} (a {kind.__name__}) cannot be set from the command line")
  try:
    value = _PARSERS[kind].parse(text)
  except (ValueError, TypeError):
    raise ValueError(f"{key}={text}: expected {_EXPECTED[kind]}") from None
  parent, _, last = key.rpartition(".")
  node = _get(config, parent) if parent else config
  try:
    node[last] = value
  except TypeError as e:
    raise ValueError(f"{key}={text}: {e}") from None


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """A copy of `config` with each `KEY: TEXT` of `overrides` set as by `override`."""
  config = copy.deepcopy(config)
  for key, text in overrides.items():
    override(config, key, text)
  return config


def _optional(check):
  test, text = check
  return lambda v: v is None or test(v), f"None or {text}"


def _one_of(choices):
  return lambda v: v in choices, f"one of {choices}"


# Every range the trainer relies on; the optimizer's are optim.check's, the model's its
# config's, an objective's settings its own (objectives.from_config names the section).
CHECKS = {
    "seed": optim.int_at_least(0),
    "batch_size": optim.int_at_least(1),
    "objective.length": optim.int_at_least(1),
    "data.format": _one_of((None, "text", "jsonl", "array_record")),
    "data.split": _one_of(sources.SPLITS),
    "data.validation_fraction": optim.number(lambda v: 0 < v < 1, "in (0, 1)"),
    "data.split_method": _one_of(("tail", "hash")),
    "data.packing": _one_of(pipeline.PACKINGS),
    "data.shuffle_window": optim.int_at_least(0),
    "data.shards": _optional(optim.int_at_least(1)),
    "data.examples_per_batch": _optional(optim.int_at_least(1)),
    "data.worker_count": optim.int_at_least(0),
    "data.prefetch": optim.int_at_least(0),
    "train.steps": optim.int_at_least(0),  # 0: evaluate and sample without training
    "train.log_every": optim.int_at_least(1),
    "train.eval_every": optim.int_at_least(0),  # 0: never
    "train.eval_batches": optim.int_at_least(1),
    "train.checkpoint_every": optim.int_at_least(1),
    "train.keep_checkpoints": optim.int_at_least(1),
    "train.sample_tokens": optim.int_at_least(0),
    "train.eval_tasks": (lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(s, str) for s in v), "a list of KIND:PATH task specs (llmjax/evaluation)"),
}


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"the config has no field {key}")
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field outside its range: `train.steps=-5 must be an
  int >= 0`. Call it before a run is built: it reads nothing but the config."""
  for key, (test, expected) in CHECKS.items():
    value = _get(config, key)
    if not test(value):
      raise ValueError(f"{key}={value!r} must be {expected}")
  shape = tuple(_get(config, "mesh.shape"))
  if (len(shape) != 3 or shape.count(-1) > 1
      or not all(isinstance(s, int) and (s == -1 or s >= 1) for s in shape)):
    raise ValueError(f"mesh.shape={shape} must be 3 sizes (data, fsdp, tensor), each >= 1 or "
                     f"one -1 for the rest")
  if not isinstance(_get(config, "data.path"), str) or not config.data.path:
    raise ValueError(f"data.path={config.data.path!r} must name files, or be 'builtin'")
  optim.check(config.optimizer)
