"""Bad config input is refused where it is read, in one line naming the field: the experiment
file and variant, a command-line override, a value out of range, an optimizer setting."""

import math
import os

import pytest

from llmjax.train import config as config_lib
from llmjax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {"gpt": ("tiny", "small"), "bert": ("tiny", "base"), "t5": ("tiny", "small", "base"),
            "prefix_lm": ("tiny",), "shakespeare_char": ("baseline",),
            "shakespeare_speedrun": ("speedrun",)}


def experiment_path(name: str) -> str:
  return os.path.join(ROOT, "experiments", f"{name}.py")


def one_line_error(fn, *args, match: str, kind=ValueError):
  """fn(*args) raises `kind` whose message is one line holding `match` verbatim."""
  with pytest.raises(kind) as info:
    fn(*args)
  message = str(info.value)
  assert match in message and "\n" not in message, message
  return message


def test_every_experiment_variant_loads_and_validates():
  """Every shipped variant (and the default) is in range, and loads by `--config=` spec."""
  config_lib.validate(config_lib.load_experiment(None))
  for name, variants in VARIANTS.items():
    for variant in variants:
      config = config_lib.load_experiment(f"{experiment_path(name)}:{variant}")
      config_lib.validate(config)
      config_lib.validate(config_lib.shrink_for_cpu(config))


def test_a_bad_experiment_spec_is_one_line(tmp_path):
  """A missing file (and the nearest name beside it), a directory, an unknown variant (and the
  valid ones), a variant for a file that takes none, a file without get_config()."""
  gpt = experiment_path("gpt")
  one_line_error(config_lib.load_experiment, gpt.replace("gpt.py", "gtp.py"),
                 match="gtp.py does not exist; did you mean", kind=FileNotFoundError)
  one_line_error(config_lib.load_experiment, gpt.replace("gpt.py", "nope.py"),
                 match="nope.py does not exist", kind=FileNotFoundError)
  one_line_error(config_lib.load_experiment, os.path.dirname(gpt), match="is a directory")
  one_line_error(config_lib.load_experiment, f"{gpt}:huge",
                 match="gpt.py: unknown variant 'huge'; expected tiny or small")
  one_line_error(config_lib.load_experiment, f"{experiment_path('shakespeare_char')}:x",
                 match="expected baseline")
  (tmp_path / "fixed.py").write_text("import ml_collections\n\ndef get_config():\n"
                                     "  return ml_collections.ConfigDict({'a': 1})\n")
  one_line_error(config_lib.load_experiment, f"{tmp_path}/fixed.py:big",
                 match="takes no variant, got 'big'")
  (tmp_path / "empty.py").write_text("x = 1\n")
  one_line_error(config_lib.load_experiment, f"{tmp_path}/empty.py",
                 match="defines no get_config()")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  one_line_error(config_lib.load_experiment, f"{tmp_path}/broken.py", match="broken.py:1: ")


def test_override_names_the_nearest_field_and_the_type():
  """`--config.KEY=TEXT` as ml_collections reads it: a misspelled key names the nearest field,
  text of the wrong type names the type; good text of every field type is set."""
  config = config_lib.base_config()
  for key, match in [
      ("optimizer.learning_rat", "optimizer.learning_rat: no such field; did you mean "
                                 "optimizer.learning_rate?"),
      ("optimiser.learning_rate", "did you mean optimizer.learning_rate?"),
      ("model.num_layer", "did you mean model.num_layers?"),
      ("nothing_like_it", "no such field; the config has "),
      ("train.steps.x", "train.steps is a field, not a section"),
      ("optimizer", "optimizer is a section, not a field"),
  ]:
    one_line_error(config_lib.override, config, key, "1", match=match)
  for key, text, match in [("train.steps", "abc", "train.steps=abc: expected an int"),
                           ("optimizer.b1", "high", "optimizer.b1=high: expected a number"),
                           ("runlocal", "maybe", "runlocal=maybe: expected true or false"),
                           ("mesh.shape", "(1,1", "mesh.shape=(1,1: expected a tuple"),
                           ("data.shards", "two", "data.shards=two: expected an int")]:
    one_line_error(config_lib.override, config, key, text, match=match)
  good = config_lib.with_overrides(config, {
      "train.steps": "7", "optimizer.learning_rate": "1", "runlocal": "false",
      "mesh.shape": "(1,2,1)", "data.shards": "2", "data.format": "jsonl"})
  assert (good.train.steps, good.optimizer.learning_rate, good.runlocal) == (7, 1.0, False)
  assert (tuple(good.mesh.shape), good.data.shards, good.data.format) == ((1, 2, 1), 2, "jsonl")
  assert config.train.steps == 1000  # the original is untouched


@pytest.mark.parametrize("key,value,match", [
    ("train.steps", -5, "train.steps=-5 must be an int >= 0"),
    ("train.log_every", 0, "train.log_every=0 must be an int >= 1"),
    ("train.eval_every", -1, "train.eval_every=-1 must be an int >= 0"),
    ("train.eval_batches", 0, "train.eval_batches=0 must be an int >= 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be an int >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be an int >= 1"),
    ("train.sample_tokens", -1, "train.sample_tokens=-1 must be an int >= 0"),
    ("batch_size", 0, "batch_size=0 must be an int >= 1"),
    ("seed", -1, "seed=-1 must be an int >= 0"),
    ("objective.length", 0, "objective.length=0 must be an int >= 1"),
    ("data.validation_fraction", 1.0, "data.validation_fraction=1.0 must be in (0, 1)"),
    ("data.split", "sentence", "data.split='sentence' must be one of"),
    ("data.shards", 0, "data.shards=0 must be None or an int >= 1"),
    ("data.worker_count", -1, "data.worker_count=-1 must be an int >= 0"),
    ("mesh.shape", (-1, -1, 1), "mesh.shape=(-1, -1, 1) must be 3 sizes"),
    ("data.path", "", "data.path='' must name files"),
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate=-0.001 must be > 0"),
])
def test_validate_names_the_field_out_of_range(key, value, match):
  """validate() raises one line naming the first field out of range and its bound."""
  config = config_lib.base_config()
  *parents, last = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value
  one_line_error(config_lib.validate, config, match=match)


def test_zero_steps_is_a_run():
  """train.steps=0 evaluates and samples the initial parameters: in range."""
  config = config_lib.base_config()
  config.train.steps = 0
  config_lib.validate(config)


@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0.0, "optimizer.learning_rate=0.0 must be > 0"),
    ("learning_rate", float("nan"), "optimizer.learning_rate=nan must be > 0"),
    ("final_learning_rate", -1e-4, "optimizer.final_learning_rate=-0.0001 must be >= 0"),
    ("warmup_steps", -1, "optimizer.warmup_steps=-1 must be an int >= 0"),
    ("b1", 1.0, "optimizer.b1=1.0 must be in [0, 1)"),
    ("b2", -0.1, "optimizer.b2=-0.1 must be in [0, 1)"),
    ("eps", 0.0, "optimizer.eps=0.0 must be > 0"),
    ("weight_decay", -0.1, "optimizer.weight_decay=-0.1 must be >= 0"),
    ("clip_norm", -1.0, "optimizer.clip_norm=-1.0 must be >= 0"),
    ("microbatches", 0, "optimizer.microbatches=0 must be an int >= 1"),
    ("name", "sgd", "optimizer.name='sgd' must be one of"),
    ("schedule", "step", "optimizer.schedule='step' must be one of"),
])
def test_optimizer_names_the_field_out_of_range(field, value, match):
  """optim.optimizer refuses each out-of-range setting of the optimizer section by name."""
  opt = config_lib.base_config().optimizer
  opt[field] = value
  one_line_error(optim.optimizer, opt, 100, match=match)


def test_negative_steps_are_not_blamed_on_the_warmup():
  """A negative run length is named as such, not as `optimizer.warmup_steps=50 must be >= 0`."""
  opt = config_lib.base_config().optimizer
  message = one_line_error(optim.schedule, opt, -5, match="train.steps")
  assert "warmup" not in message
  assert math.isfinite(float(optim.schedule(opt, 0)(0)))  # 0 steps: a schedule still exists
