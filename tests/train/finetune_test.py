"""Fine-tuning through the trainer: LoRA's frozen base, its optimizer and gradients, SFT's
masked and accumulated gradients, the experiments' smoke runs, bad input before any work."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from llmjax import data, peft, train
from llmjax.train import config as config_lib
from llmjax.train import experiment, step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """tools/build_finetune_data.py's sets, built once (in a process of its own: its absl flags
  would clash with other tools' in this one)."""
  out = str(tmp_path_factory.mktemp("finetune_data"))
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_finetune_data.py"),
                  f"--out_dir={out}"], check=True, capture_output=True)
  return out


def _config(name, data_dir, kind, steps=20, **lora):
  c = config_lib.load_experiment(os.path.join(ROOT, "experiments", name))
  c.data.update(path=f"{data_dir}/{kind}_train.jsonl", eval_path=f"{data_dir}/{kind}_eval.jsonl")
  c.train.update(steps=steps, log_every=10, eval_every=steps, eval_batches=2,
                 checkpoint_every=1000, sample_tokens=0)
  c.optimizer.warmup_steps = 5
  if lora:
    c.lora.update(lora)
  return c


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_lora_trains_adapters_and_head_only(data_dir, tmp_path):
  """20 steps of LoRA on a BERT classifier: every base parameter bitwise unchanged, every
  adapter and the head moved; the checkpoint holds no base; the optimizer's state is at most
  two numbers per trained one, and the step's gradients exist for the trained leaves only."""
  config = _config("classify.py:tiny", data_dir, "pairs", rank=4)
  before = _flat(train.train(_config("classify.py:tiny", data_dir, "pairs", steps=0, rank=4),
                             str(tmp_path / "zero"), log=lambda _: None).params)
  result = train.train(config, str(tmp_path / "run"), log=lambda _: None)
  after = _flat(result.params)
  assert before.keys() == after.keys()
  trained = [k for k in after if peft.is_adapter(k) or k.startswith("classifier/")]
  assert any(k.endswith("query_kernel_lora_a") for k in trained) and "classifier/kernel" in trained
  for k in after:
    moved = not np.array_equal(before[k], after[k])
    assert moved == (k in trained) or k.endswith("_lora_a") and not moved, k
  assert all(not np.array_equal(before[k], after[k]) for k in trained if not k.endswith("_lora_a"))
  saved = os.listdir(tmp_path / "run" / "checkpoints" / "20" / "state")
  assert saved  # the step's state: params (trained leaves) and the optimizer, no "frozen"
  setup = result.setup
  abstract, _, _ = step.init_state(setup, jax.random.key(0))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert set(_flat(abstract["params"])) == set(trained)
  assert size(abstract["opt_state"]) <= 2 * size(abstract["params"]) + 16
  batch = data.padding_batch(setup.objective, 2)
  grads, _ = jax.eval_shape(lambda s, b: step.gradients(setup, s, b, jax.random.key(0)),
                            abstract, batch)
  assert set(_flat(grads)) == set(trained)


def test_lora_resume_rebuilds_the_frozen_base(data_dir, tmp_path):
  """A LoRA run stopped at step 2 and resumed ends bitwise where an uninterrupted one does:
  its checkpoints hold the adapters and the head; the base comes back from the seed."""
  config = _config("sft.py:tiny_lora", data_dir, "sft", steps=4)
  config.optimizer.decay_steps = 4
  whole = train.train(config, str(tmp_path / "whole"), log=lambda _: None)
  config.train.update(steps=2, checkpoint_every=2)
  train.train(config, str(tmp_path / "split"), log=lambda _: None)
  config.train.steps = 4
  resumed = train.train(config, str(tmp_path / "split"), log=lambda _: None)
  a, b = _flat(whole.params), _flat(resumed.params)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sft_prompt_logits_get_no_gradient_and_microbatches_add_up(data_dir):
  """The loss's gradient w.r.t. logits is exactly zero where the target is prompt, and four
  microbatches give one batch's gradient (normalised by the response tokens of the whole)."""
  config = _config("sft.py:tiny", data_dir, "sft")
  config.batch_size = 8
  setup = experiment.build(config)
  it = iter(experiment.make_pipeline(setup, "train"))
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  it.close()
  state = step.init_state(setup, jax.random.key(0))[2](jax.random.key(0))
  logits = jax.jit(lambda p: setup.objective.logits(setup.model, {"params": p}, batch))(
      state["params"])
  g = jax.jit(jax.grad(lambda x: setup.objective.loss(x, batch)[0]))(logits)
  prompt = np.asarray(batch["weights"]) == 0
  assert prompt.any() and (~prompt).any()
  assert np.all(np.asarray(g)[prompt] == 0) and np.abs(np.asarray(g)[~prompt]).max() > 0
  key = jax.random.key(1)
  gradients = lambda: jax.jit(functools.partial(step.gradients, setup))(state, batch, key)
  one, sums = gradients()
  setup.microbatches = 4
  four, sums4 = gradients()
  assert float(sums["weight"]) == float(sums4["weight"])
  for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(x / sums["weight"], y / sums4["weight"], atol=1e-6)


@pytest.mark.parametrize("name,kind", [("classify.py:tiny", "comments"), ("sft.py:tiny", "sft"),
                                       ("t5_finetune.py:tiny", "seq2seq")])
def test_experiments_learn(data_dir, tmp_path, name, kind):
  """Each fine-tuning experiment's tiny variant lowers its eval loss in 40 steps; the
  classifier (from scratch: next-paragraph pairs need a pre-trained BERT) on a label it can
  learn from scratch, does the paragraph hold a "#", in 100 steps at lr 3e-3 (its loss stays
  near the class prior's for about 50; it is learned by step 75)."""
  if kind == "comments":
    for part in ("train", "eval"):
      with open(f"{data_dir}/pairs_{part}.jsonl") as f, open(tmp_path / f"{part}.jsonl", "w") as g:
        g.writelines(json.dumps({"text": r["text"], "label": int("#" in r["text"])}) + "\n"
                     for r in map(json.loads, f))
  config = _config(name, data_dir, kind, steps=100 if kind == "comments" else 40)
  if kind == "comments":
    config.data.update(path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"))
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    config.train.eval_batches = 4
  result = train.train(config, str(tmp_path / "run"), log=lambda _: None)
  evals = [h["eval/loss"] for h in result.history if "eval/loss" in h]
  assert evals[-1] < evals[0] - (0.2 if kind == "comments" else 0.5), evals
  if kind == "comments":
    assert {"eval/accuracy", "eval/f1"} <= set(result.history[-1])


def test_bad_fine_tuning_input_is_one_line_before_training(data_dir, tmp_path):
  config = _config("classify.py:tiny", data_dir, "pairs")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 5}\n')
  config.data.path = str(bad)
  with pytest.raises(ValueError, match=r"bad.jsonl:2: label 5 is outside num_labels=2"):
    train.train(config, str(tmp_path / "a"), log=lambda _: None)
  bad.write_text('{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text'"):
    train.train(config, str(tmp_path / "b"), log=lambda _: None)
  config = _config("classify.py:tiny", data_dir, "pairs", rank=4, targets=".*/nothing")
  with pytest.raises(ValueError, match=r"match no projection"):
    train.train(config, str(tmp_path / "c"), log=lambda _: None)
  config = _config("classify.py:tiny", data_dir, "pairs", rank=0)
  with pytest.raises(ValueError, match=r"LoRA rank=0 must be an int > 0"):
    train.train(config, str(tmp_path / "d"), log=lambda _: None)
  config = _config("classify.py:tiny", data_dir, "pairs")
  config.model.num_labels = 3
  with pytest.raises(ValueError, match=r"objective.num_labels=2 needs model.head='classify' and "
                     r"model.num_labels=2"):
    train.train(config, str(tmp_path / "e"), log=lambda _: None)
  config = _config("classify.py:tiny", data_dir, "pairs")
  config.model.num_labels = 3
  three = tmp_path / "three_labels"
  from llmjax import checkpoint, models
  bert = models.Bert(models.BertConfig(**{k: v for k, v in config.model.to_dict().items()
                                          if k != "family"}))
  checkpoint.save_model(str(three), bert, nn.meta.unbox(
      bert.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]))
  config = _config("classify.py:tiny", data_dir, "pairs")
  config.train.init_from = str(three)
  with pytest.raises(ValueError, match=r"classifier/kernel: \(64, 3\) there, \(64, 2\) here.*"
                     r"a classification head of another num_labels"):
    train.train(config, str(tmp_path / "g"), log=lambda _: None)
  config = _config("sft.py:tiny", data_dir, "sft")
  config.objective.length = 8
  with pytest.raises(ValueError, match=r"every prompt is longer than length=8"):
    train.train(config, str(tmp_path / "f"), log=lambda _: None)


def test_lora_on_a_checkpoint_loads_back_as_base_plus_adapters(data_dir, tmp_path):
  """init_from a pre-trained BERT (MLM head: dropped; a new classifier): LoRA trains, and
  checkpoint.load_model(workdir) is that BERT with the run's adapters and head. A layer new to
  the checkpoint that LoRA would leave frozen at random (a missing pooler) is refused."""
  from llmjax import checkpoint, models
  config = _config("classify.py:tiny", data_dir, "pairs", steps=3, rank=4)
  cfg = models.BertConfig(**{k: v for k, v in config.model.to_dict().items()
                             if k != "family"} | {"head": "mlm", "num_labels": 0})
  bert = models.Bert(cfg)
  params = nn.meta.unbox(bert.init(jax.random.key(7), jnp.ones((1, 8), jnp.int32))["params"])
  checkpoint.save_model(str(tmp_path / "bert"), bert, params)
  config.train.init_from = str(tmp_path / "bert")
  result = train.train(config, str(tmp_path / "run"), log=lambda _: None)
  got = _flat(result.params)
  assert np.array_equal(got["encoder/layers_0/attn/key_kernel"],
                        params["encoder"]["layers_0"]["attn"]["key_kernel"])
  model, loaded = checkpoint.load_model(str(tmp_path / "run"))
  assert model.lora.rank == 4
  tokens = jnp.asarray(np.arange(16).reshape(2, 8) % 300 + 1)
  np.testing.assert_array_equal(model.apply({"params": loaded}, tokens),
                                result.setup.model.apply({"params": result.params}, tokens))
  bert = models.Bert(cfg.replace(pooler=False))
  checkpoint.save_model(str(tmp_path / "nopooler"), bert,
                        bert.init(jax.random.key(7), jnp.ones((1, 8), jnp.int32))["params"])
  config.train.init_from = str(tmp_path / "nopooler")
  with pytest.raises(ValueError, match=r"pooler_dense/bias is not in train.init_from and LoRA "
                     r"would freeze it"):
    train.train(config, str(tmp_path / "run2"), log=lambda _: None)


def test_qlora_quantizes_the_base_as_it_loads(data_dir, tmp_path):
  """lora.quantize=nf4 with scanned layers on a (2, 2, 2) mesh: init_from's float base loads
  quantized (nf4 values, scales), sharded as its kernels, bitwise frozen while the adapters
  train; load_model(workdir) gives the run's logits."""
  from llmjax import checkpoint, models, quant
  config = _config("sft.py:tiny_qlora", data_dir, "sft", steps=3)
  config.model.scan_layers = True
  config.mesh.shape = (2, 2, 2)
  gpt = models.model_from_dict(config.model.to_dict())
  params = nn.meta.unbox(gpt.init(jax.random.key(7), jnp.ones((1, 8), jnp.int32))["params"])
  checkpoint.save_model(str(tmp_path / "base"), gpt, params)
  config.train.init_from = str(tmp_path / "base")
  result = train.train(config, str(tmp_path / "run"), log=lambda _: None)
  got = traverse_util.flatten_dict(result.params, sep="/")
  query = got["layers/attn/query_kernel"]
  assert isinstance(query, quant.WithAux) and query.array.qtype == "nf4"
  assert "tensor" in str(query.array.qvalue.sharding.spec)
  # Through the steps, the base stays what quantizing init_from's weights gives, bitwise.
  want = traverse_util.flatten_dict(quant.fill(params, quant.abstract(result.setup.model)), sep="/")
  for k, v in want.items():
    if isinstance(v, quant.WithAux):
      assert np.array_equal(got[k].array.qvalue, v.array.qvalue), k
      assert np.array_equal(got[k].array.scale, v.array.scale), k
  assert not np.any(got["layers/attn/query_kernel_lora_b"] == 0)  # trained
  model, loaded = checkpoint.load_model(str(tmp_path / "run"))
  tokens = jnp.asarray(np.arange(16).reshape(2, 8) % 200 + 1)
  np.testing.assert_allclose(model.apply({"params": loaded}, tokens),
                             result.setup.model.apply({"params": result.params}, tokens),
                             atol=1e-5)


def test_lora_with_scan_remat_bfloat16_on_a_mesh(data_dir, tmp_path):
  """LoRA under scan_layers, full remat and bfloat16 compute on a (2, 2, 2) mesh: adapters
  sharded by their kernels' axes (B's output over "tensor"), the base untouched."""
  def config(steps):
    c = _config("sft.py:tiny_lora", data_dir, "sft", steps=steps)
    c.model.update(scan_layers=True, remat_policy="full", dtype="bfloat16")
    c.mesh.shape = (2, 2, 2)
    return c
  before = _flat(train.train(config(0), str(tmp_path / "zero"), log=lambda _: None).params)
  result = train.train(config(3), str(tmp_path / "run"), log=lambda _: None)
  after = _flat(result.params)
  for k in after:
    assert np.array_equal(before[k], after[k]) != peft.is_adapter(k), k
  b = result.params["layers"]["attn"]["query_kernel_lora_b"]
  assert b.shape[0] == config(0).model.num_layers and "tensor" in str(b.sharding.spec)


def test_examples_per_batch_is_a_batch_size_in_examples(data_dir):
  """data.examples_per_batch=6 puts 6 pairs into each step's 8 rows (3 from each of two data
  shards; these byte-level pairs fill a row each), and a count the shards cannot split is
  refused before any work."""
  config = _config("classify.py:tiny", data_dir, "pairs")
  config.batch_size = 8
  config.data.update(examples_per_batch=6, shards=2)
  it = iter(experiment.make_pipeline(experiment.build(config), "train"))
  labels = [int(np.sum(next(it)["weights"] > 0)) for _ in range(5)]
  it.close()
  assert labels == [6] * 5, labels
  config.data.examples_per_batch = 13
  with pytest.raises(ValueError, match="examples_per_batch=13 is not divisible by the 2 data"):
    experiment.build(config)
