"""Loading a finished run or a model checkpoint: the very parameters, the model, the tokenizer,
no warnings, and errors that name what is missing."""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llmjax import checkpoint, models, train
from tests import tools_generate_test
from tests.train.train_test import experiment


def tiny_char_run(root, **model_overrides):
  """Trains a 2-step char-level GPT (nanoGPT's experiment, shrunk) on a stand-in text under
  `root`, checkpointed at steps 1 and 2; returns (workdir, Result)."""
  rng = np.random.default_rng(0)
  words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "come", "ROMEO:"]
  text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(200)) + "\n"
  (root / "play.txt").write_text(text)
  config = experiment("shakespeare_char", "baseline")
  config.model.update(vocab_size=len(set(text)), d_model=32, num_layers=1, num_heads=2,
                      max_seq_len=32, **model_overrides)
  config.objective.length = 32
  config.data.update(path=str(root / "play.txt"), shuffle_window=64)
  config.batch_size = 8
  config.optimizer.warmup_steps = 0
  config.train.update(steps=2, log_every=1, eval_every=0, checkpoint_every=1, sample_tokens=0)
  workdir = str(root / "w")
  return workdir, train.train(config, workdir, log=lambda line: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny run with bfloat16 parameters: (workdir, Result)."""
  return tiny_char_run(tmp_path_factory.mktemp("run"), param_dtype="bfloat16")


@pytest.fixture
def no_warnings(recwarn, caplog):
  """Fails the test if it warned, through `warnings` or a log record (Orbax logs via absl)."""
  caplog.set_level(logging.WARNING)
  yield
  assert not [str(w.message) for w in recwarn.list]
  assert not [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.WARNING]


def assert_same_params(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(g, jax.Array) and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_load_model_of_a_workdir_is_the_run_final_state(run, no_warnings):
  workdir, result = run
  model, params = checkpoint.load_model(workdir)
  assert model.cfg == result.setup.model.cfg
  assert_same_params(params, result.params)  # step 2's, not step 1's
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(params))
  config = checkpoint.load_config(workdir)
  assert config.model.to_dict() == result.setup.config.model.to_dict()


def test_save_model_round_trip_and_shardings(run, tmp_path, no_warnings):
  """save_model -> load_model gives the same parameters, unboxed even when saved boxed;
  `shardings` places them, for a model checkpoint and a workdir alike."""
  workdir, result = run
  model = result.setup.model
  boxed = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  checkpoint.save_model(str(tmp_path / "m"), model, boxed)
  loaded_model, params = checkpoint.load_model(str(tmp_path / "m"))
  assert loaded_model.cfg == model.cfg
  assert_same_params(params, jax.tree.map(jnp.asarray, nn.meta.unbox(boxed)))

  mesh = jax.make_mesh((2, 4), ("a", "b"))
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, P(*(["b"] if x.shape[0] % 4 == 0
                                                              else [None]))), result.params)
  for path in (str(tmp_path / "m"), workdir):
    _, params = checkpoint.load_model(path, shardings=shardings)
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
  assert_same_params(params, result.params)
  _, params = checkpoint.load_model(workdir, shardings=NamedSharding(mesh, P()))
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))


def test_load_params_reads_a_workdir_as_placed(run, no_warnings):
  workdir, result = run
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          result.params)
  assert_same_params(checkpoint.load_params(workdir, abstract), result.params)


def test_load_tokenizer_of_a_workdir_is_the_run_one(run, tmp_path):
  workdir, result = run
  tokenizer = checkpoint.load_tokenizer(workdir)
  assert tokenizer.fingerprint == result.setup.tokenizer.fingerprint
  assert tokenizer.spec == result.setup.tokenizer.spec
  # A char tokenizer needs its corpus: gone (or relative to another directory), it is named.
  moved = tmp_path / "moved"
  moved.mkdir()
  config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
  config["data"]["path"] = "play.txt"
  (moved / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"tokenizer of workdir .*moved \(char:play.txt\) cannot"):
    checkpoint.load_tokenizer(str(moved))


def one_line_error(fn, *args, match):
  with pytest.raises(ValueError, match=match) as e:
    fn(*args)
  assert "\n" not in str(e.value), str(e.value)


def test_what_is_missing_is_named(run, tmp_path):
  workdir, result = run
  for fn in (checkpoint.load_model, lambda p: checkpoint.load_params(p, result.params)):
    one_line_error(fn, str(tmp_path), match=r"is neither a model checkpoint \(model.json \+ "
                   r"params/\) nor an llmjax workdir \(config.json \+ checkpoints/\)")
    one_line_error(fn, str(tmp_path / "nope"), match="nope does not exist")
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(pathlib.Path(workdir) / "config.json", empty / "config.json")
  one_line_error(checkpoint.load_model, str(empty), match="workdir .*empty holds no checkpoint yet")
  (empty / "checkpoints").mkdir()
  one_line_error(checkpoint.load_model, str(empty), match="holds no checkpoint yet")
  assert checkpoint.load_config(str(empty)).model.d_model == 32  # written before any step

  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  one_line_error(checkpoint.load_model, str(hf), match="config.json has no model section")
  headless = tmp_path / "headless"
  shutil.copytree(pathlib.Path(workdir) / "checkpoints", headless / "checkpoints")
  one_line_error(checkpoint.load_model, str(headless), match="checkpoints but no config.json")
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "model.json").write_text(json.dumps(models.config_to_dict(result.setup.model.cfg)))
  one_line_error(checkpoint.load_model, str(bare), match="has model.json but no params/")
  one_line_error(checkpoint.load_tokenizer, str(bare), match="tokenizer of model checkpoint")
  one_line_error(checkpoint.load_config, str(bare), match="no config.json")


def test_generate_tool_samples_from_the_workdir(run, tmp_path):
  """Prompts from a file (blank lines skipped), sampled in one batch: each sample is its prompt
  and 20 more characters; --stream (rows printed as they finish) prints the same samples. A
  request generate refuses (more positions than the model learned) is one line, run alongside."""
  workdir = run[0]
  (tmp_path / "prompts.txt").write_text("ROMEO:\n\n  \nthou art\n")
  args = (f"--workdir={workdir}", f"--prompts_file={tmp_path / 'prompts.txt'}",
          "--max_new_tokens=20", "--temperature=0.8", "--top_k=5", "--top_p=0.95", "--seed=1")
  plain, streamed, long = tools_generate_test.generate(
      args, (*args, "--stream"), (f"--workdir={workdir}", "--prompt=ROMEO:",
                                  "--max_new_tokens=100"))
  assert plain.returncode == streamed.returncode == 0, plain.stderr[-3000:] + streamed.stderr
  plain = tools_generate_test.samples(plain.stdout)
  assert sorted(plain) == [1, 2]
  for i, prompt in ((1, "ROMEO:"), (2, "thou art")):
    assert plain[i].startswith(prompt) and len(plain[i]) == len(prompt) + 20, plain
  assert tools_generate_test.samples(streamed.stdout) == plain
  assert long.returncode != 0 and long.stderr == (
      "generate.py: a prompt of 6 tokens plus max_new_tokens=100 is 106 positions, beyond the "
      "model's 32 learned positions (GPTConfig.max_seq_len)\n"), long.stderr
