"""llmjax.quant: bytes at GPT-2 small's shape, quality on a briefly trained model, qwix's own
numerics, the scale's error bound, QLoRA, sharding, generation, checkpoints and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import linen as nn
from flax import traverse_util

from llmjax import checkpoint, decode, evaluation, peft, quant
from llmjax import sharding as sh
from llmjax.data import ByteTokenizer
from llmjax.models import GPT, T5, Bert, BertConfig, GPTConfig, T5Config
from tests import tiny_lm

TOK = ByteTokenizer(0)
CFG = GPTConfig.from_size("tiny", vocab_size=TOK.vocab_size, num_layers=2, positions="rope",
                          dropout_rate=0.0)
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered the rightful property of some "
        "one or other of their daughters. ")


@pytest.fixture(scope="module")
def trained():
  """(model, params, held-out ids): a byte GPT after 300 Adam steps on TEXT's first 80%."""
  model, ids = GPT(CFG), TOK.encode(TEXT * 4).astype(np.int32)
  train_ids, held_out = ids[:int(0.8 * len(ids))], ids[int(0.8 * len(ids)):]
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"]
  params, loss = tiny_lm.fit(model, params, train_ids, steps=300, length=64, batch=16)
  assert loss < 1.5
  return model, params, held_out


def _leaves(tree):
  return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: isinstance(x, quant.WithAux))


def test_bytes_at_gpt2_small_shape():
  """Values at their bits plus float32 scales: int8 <= 0.27x, int4 <= 0.15x of float32, for
  the quantized layers (default targets) and, with every weight targeted, the whole tree."""
  model = GPT(GPTConfig())
  floats = _leaves(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                   ["params"])
  floats = {k: v.unbox() if hasattr(v, "unbox") else v for k, v in floats.items()}
  for qtype, bound in (("int8", 0.27), ("int4", 0.15)):
    for targets in (None, ".*"):
      shapes = _leaves(quant.abstract(quant.wrap(model, quant.QuantConfig(qtype, targets))))
      shapes = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes,
                            is_leaf=lambda x: hasattr(x, "unbox"))
      chosen = [k for k, v in shapes.items() if isinstance(v, quant.WithAux)]
      layers = quant.nbytes({k: shapes[k] for k in chosen}) / quant.nbytes(
          {k: floats[k] for k in chosen})
      assert layers <= bound, (qtype, targets, layers)
      if targets:
        assert "wte/embedding" in chosen and "wpe/embedding" in chosen
        assert quant.nbytes(shapes) / quant.nbytes(floats) <= bound
      else:
        assert len(chosen) == 12 * 6 and not any("embedding" in k for k in chosen)


def test_perplexity_cost_on_a_trained_model(trained):
  """Held-out perplexity rises <= 1% (int8), <= 3% (w8a8), <= 8% (int4)."""
  model, params, held_out = trained
  ppl = lambda m, p: evaluation.perplexity(m, p, held_out, context_length=64)["perplexity"]
  base = ppl(model, params)
  for qtype, bound in (("int8", 0.01), ("w8a8", 0.03), ("int4", 0.08)):
    rise = ppl(*quant.quantize(model, params, qtype)) / base - 1
    assert rise <= bound, f"{qtype}: perplexity {base:.4f} rose {rise:.2%}"


def test_logits_are_qwix_numerics_for_the_same_rules(trained):
  """qwix's stock PTQ (rules by module path on the projections' dot_general) gives the same
  logits as quantize's rules by weight path."""
  model, params, _ = trained
  tokens = jnp.asarray(TOK.encode(TEXT[:48]))[None]
  for qtype, (weight, act), tile in (("int8", (jnp.int8, None), None),
                                     ("w8a8", (jnp.int8, jnp.int8), None),
                                     ("int4", (jnp.int4, None), 16)):
    qmodel, qparams = quant.quantize(model, params, qtype, tile_size=tile)
    rule = qwix.QuantizationRule(module_path=r".*(attn|mlp/\w+)", op_names=("dot_general",),
                                 weight_qtype=weight, act_qtype=act, tile_size=tile)
    ref = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ref.init, jax.random.key(0), tokens)["params"]
    ref_params = qwix.quantize_params(params, abstract)
    np.testing.assert_allclose(qmodel.apply({"params": qparams}, tokens),
                               ref.apply({"params": ref_params}, tokens), rtol=0, atol=1e-6)


def test_dequantized_error_is_within_half_a_step(trained):
  """int8: one scale per output channel, absmax / 127.5; int4: per tile of 16 along the
  contracted dimension, absmax / 7.5; every value within half a scale of the weight."""
  model, params, _ = trained
  flat = traverse_util.flatten_dict(params, sep="/")
  for qtype, qmax, tile in (("int8", 127.5, None), ("int4", 7.5, 16)):
    qflat = _leaves(quant.quantize(model, params, qtype, tile_size=tile)[1])
    w, q = flat["layers_0/mlp/wi/kernel"], qflat["layers_0/mlp/wi/kernel"].array  # [D, F]
    blocks = w.reshape(-1, tile or w.shape[0], w.shape[1])
    np.testing.assert_allclose(q.scale, np.abs(blocks).max(1) / qmax, rtol=1e-6)
    err = np.abs(np.asarray(qwix.dequantize(q)) - w).reshape(blocks.shape)
    assert (err <= q.scale[:, None] / 2 * (1 + 1e-4)).all()  # float32 rounding of w / scale
    assert q.qvalue.dtype == (jnp.int8 if qtype == "int8" else jnp.int4)
  # Weight-only int8 computes x . dequantize(W): the float model on dequantized weights agrees.
  qmodel, qparams = quant.quantize(model, params, "int8")
  plain, dequantized = quant.dequantize(qmodel, qparams)
  tokens = jnp.asarray(TOK.encode(TEXT[:48]))[None]
  assert type(plain) is GPT and not quant.is_quantized(dequantized)
  np.testing.assert_allclose(plain.apply({"params": dequantized}, tokens),
                             qmodel.apply({"params": qparams}, tokens), atol=1e-4)


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_qlora_trains_adapters_over_a_frozen_quantized_base(trained, base):
  """Only the float32 adapters train (the trainer's test checks the base stays bitwise through
  its steps); the loss falls; merge's float weights give the QLoRA model's logits."""
  model, params, _ = trained
  ids = TOK.encode(TEXT).astype(np.int32)
  windows = jnp.asarray(np.stack([ids[i:i + 33] for i in range(0, 256, 32)]))
  lora = peft.wrap(model, peft.LoraConfig(rank=4, alpha=8.0, quantize=base,
                                          targets=r".*(attn|mlp)/\w+"))
  train, frozen = peft.split(peft.add_adapters(lora, params, (windows[:, :-1],)),
                             peft.trainable(lora))
  assert quant.is_quantized(frozen) and not quant.is_quantized(train)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(train))
  tx = optax.adam(1e-2)

  @jax.jit
  def step(train, opt_state, frozen):
    def loss_fn(t):
      logits = lora.apply({"params": peft.combine(t, frozen)}, windows[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(train, updates), opt_state, loss

  opt_state, losses = tx.init(train), []
  for _ in range(20):
    train, opt_state, loss = step(train, opt_state, frozen)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  full = peft.combine(train, frozen)
  plain, merged = peft.merge(lora, full)
  assert not quant.is_quantized(merged) and type(plain) is GPT
  np.testing.assert_allclose(plain.apply({"params": merged}, windows[:, :-1]),
                             lora.apply({"params": full}, windows[:, :-1]), atol=1e-4)


def test_sharded_and_through_generate(trained):
  """On a 2x2x2 mesh the quantized weights keep their logical sharding and give the
  unsharded logits and greedy tokens; int8's greedy tokens agree with float's."""
  model, params, held_out = trained
  qmodel, qparams = quant.quantize(model, params, "int8", targets=".*")
  mesh = sh.make_mesh((2, 2, 2))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  placed = jax.device_put(params, sh.logical_sharding(boxed, mesh))
  _, sharded = quant.quantize(model, placed, "int8", targets=".*")
  wi = _leaves(sharded)["layers_0/mlp/wi/kernel"].array
  assert wi.qvalue.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  lora = peft.wrap(model, peft.LoraConfig(rank=2, quantize="nf4"))
  with_adapters = peft.add_adapters(lora, placed, (jnp.zeros((1, 8), jnp.int32),))
  query = _leaves(with_adapters)["layers_0/attn/query_kernel"].array
  assert query.qvalue.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  tokens = jnp.asarray(held_out[:64])[None].repeat(4, 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.RULES):
    out = jax.jit(lambda p, t: qmodel.apply({"params": p}, t))(sharded, tokens)
  np.testing.assert_allclose(out, qmodel.apply({"params": qparams}, tokens), atol=1e-4)
  # Greedy decoding of the text it learned, sharded or not: int8's tokens are float's.
  prompt = [TOK.encode(TEXT[100:120]).tolist()]
  new = np.asarray(decode.generate(qmodel, sharded, prompt, 100))
  np.testing.assert_array_equal(new, decode.generate(qmodel, qparams, prompt, 100))
  agree = (new == np.asarray(decode.generate(model, params, prompt, 100))).mean()
  assert agree >= 0.9, agree


def test_bfloat16_compute_gqa_and_an_untied_head():
  """A bfloat16-compute model of float32 parameters quantizes what it computes with (bfloat16
  projections, as init quantizes them; the float32 head and lookup), grouped kv heads and an
  untied head included; QLoRA's adapters keep the parameters' float32."""
  model = GPT(GPTConfig.from_size("tiny", vocab_size=64, num_layers=1, num_kv_heads=2,
                                  tie_embeddings=False, dtype="bfloat16"))
  tokens = jnp.arange(16)[None] % 64
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  qmodel, qparams = quant.quantize(model, params, "int8", targets=".*")
  assert {"head", "layers_0/attn/key", "wte/embedding"} <= qmodel.provider.matched
  scales = {k: v.array.scale.dtype for k, v in _leaves(qparams).items()
            if isinstance(v, quant.WithAux)}
  for k, dtype in scales.items():  # the head computes its logits, and tables look up, in float32
    assert dtype == (jnp.float32 if k in ("head", "wte/embedding", "wpe/embedding") else
                     jnp.bfloat16), k
  ref, out = model.apply({"params": params}, tokens), qmodel.apply({"params": qparams}, tokens)
  assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())
  lora = peft.wrap(model, peft.LoraConfig(rank=2, quantize="nf4"))
  train = peft.split(peft.add_adapters(lora, params, (tokens,)), peft.trainable(lora))[0]
  assert {x.dtype for x in jax.tree.leaves(train)} == {jnp.dtype(jnp.float32)}


def test_checkpoint_holds_values_and_scales(trained, tmp_path):
  model, params, held_out = trained
  qmodel, qparams = quant.quantize(model, params, "int4")
  checkpoint.save_model(str(tmp_path), qmodel, qparams)
  loaded_model, loaded = checkpoint.load_model(str(tmp_path))
  tokens = jnp.asarray(held_out[:32])[None]
  assert loaded_model.quant == qmodel.quant
  np.testing.assert_array_equal(loaded_model.apply({"params": loaded}, tokens),
                                qmodel.apply({"params": qparams}, tokens))
  stored = checkpoint._stored(checkpoint._locate(str(tmp_path)))  # pylint: disable=protected-access
  assert stored["layers_0"]["mlp"]["wi"]["kernel"]["qvalue"].dtype == jnp.int4
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize(loaded_model, loaded, "int8")
  with pytest.raises(ValueError, match="is a quantized checkpoint: fine-tune .* from the float"):
    checkpoint.load_params(str(tmp_path), params)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoders_quantize_every_entry_point(family):
  """BERT's and T5's projections and tied tables, through the entry points the decoders call
  (BERT: __call__ and hidden; T5: __call__, encode and decoder_logits)."""
  kw = dict(vocab_size=64, num_layers=1, d_model=32, num_heads=2, d_ff=64)
  if family == "bert":
    model = Bert(BertConfig(**kw, max_seq_len=16))
  else:
    model = T5(T5Config(**kw))
  tokens = jnp.arange(12)[None] % 64
  args = (tokens,) * (2 if family == "t5" else 1)
  params = jax.jit(model.init)(jax.random.key(0), *args)["params"]
  qmodel, qparams = quant.quantize(model, params, "int8", targets=".*")
  ref = model.apply({"params": params}, *args)
  out = qmodel.apply({"params": qparams}, *args)
  assert 0 < float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())
  if family == "bert":
    hidden = qmodel.apply({"params": qparams}, tokens, method="hidden")
    float_hidden = model.apply({"params": params}, tokens, method="hidden")
    assert 0 < float(jnp.abs(hidden - float_hidden).max()) < 0.05 * float(jnp.abs(float_hidden).max())
  if family == "t5":
    encoded = qmodel.apply({"params": qparams}, tokens, method="encode")
    np.testing.assert_allclose(qmodel.apply({"params": qparams}, encoded, tokens,
                                            method="decoder_logits"), out, atol=1e-5)


def test_bad_input_is_one_clear_error(trained):
  model, params, _ = trained
  cases = ((dict(qtype="int3"), "unknown qtype 'int3'"),
           (dict(qtype="int8", targets="embeddings?"), "match no weight; the model's are"),
           (dict(qtype="int4", tile_size=48), "tile_size=48 does not divide"),
           (dict(qtype="int8", tile_size=32), "with qtype int4 or nf4"),
           (dict(qtype="int8", targets="(unclosed"), "is not a regex"))
  for kw, message in cases:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
      quant.quantize(model, params, kw.pop("qtype"), **kw)
  with pytest.raises(ValueError, match="LoRA quantize='int2'"):
    peft.LoraConfig(quantize="int2")
  with pytest.raises(ValueError, match="lora.quantize='nf4' needs lora.rank"):
    peft.from_config(model, {"rank": None, "quantize": "nf4"})
  lora = peft.wrap(model, peft.LoraConfig(rank=2))
  for fn in (quant.quantize, quant.dequantize):
    with pytest.raises(ValueError, match="carries LoRA adapters.*peft.merge"):
      fn(lora, params)


def test_tools_quantize_and_bench(trained, tmp_path):
  """tools/quantize.py writes a checkpoint load_model reads back quantized and reports bytes
  and logit error; a bad qtype or an already quantized input is one line; tools/bench_quant.py
  prints a row per precision."""
  from tests.tools_test import run_tool
  model, params, _ = trained
  checkpoint.save_model(str(tmp_path / "float"), model, params)
  (tmp_path / "float" / "tokenizer_spec").write_text("byte:0")
  (tmp_path / "text.txt").write_text(TEXT * 2)
  proc = run_tool("quantize.py", f"--checkpoint={tmp_path / 'float'}", "--qtype=int4",
                  f"--out_dir={tmp_path / 'int4'}", "--tile_size=32")
  assert "to int4" in proc.stdout and "same top-1 at" in proc.stdout, proc.stdout
  loaded, qparams = checkpoint.load_model(str(tmp_path / "int4"))
  assert loaded.quant.tile_size == 32 and quant.is_quantized(qparams)
  for source, qtype, message in (("float", "int3", "unknown qtype 'int3'"),
                                 ("int4", "int8", "is already quantized (int4)")):
    proc = run_tool("quantize.py", f"--checkpoint={tmp_path / source}", f"--qtype={qtype}",
                    f"--out_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode != 0 and message in proc.stderr.splitlines()[-1], proc.stderr[-500:]
  proc = run_tool("bench_quant.py", f"--checkpoint={tmp_path / 'float'}",
                  f"--text={tmp_path / 'text.txt'}", "--nogpt2", "--precisions=float32,int8",
                  "--new_tokens=4", "--sample_tokens=20", "--repeats=1", "--batch=2")
  rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 5]
  assert [r[0].strip() for r in rows[1:]] == ["float32", "int8"], proc.stdout
  assert float(rows[2][1].strip().rstrip("x")) < 0.27
