"""Config validation (clear ValueErrors naming the field), named sizes, parameter counts."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from llmjax.models import GPT, Bert, BertConfig, GPTConfig, T5, T5Config

KEY = functools.partial(jax.random.key, impl="rbg")
FROM_SIZE = {
    "gpt": lambda **kw: GPTConfig.from_size("tiny", **kw),
    "bert": lambda **kw: BertConfig.from_size("tiny", **kw),
    "t5": lambda **kw: T5Config.from_size("tiny", **kw),
}


# --------------------------------------------------------------------------------------
# Bad configs


@pytest.mark.parametrize("family", sorted(FROM_SIZE))
def test_d_model_not_divisible_by_num_heads(family):
  with pytest.raises(ValueError, match=r"d_model=66 is not divisible by num_heads=4"):
    FROM_SIZE[family](d_model=66, head_dim=None)
  # An explicit head_dim lifts the constraint (T5's d_kv is independent of d_model).
  assert FROM_SIZE[family](d_model=66, head_dim=16).k == 16


@pytest.mark.parametrize("family", sorted(FROM_SIZE))
def test_num_heads_not_divisible_by_num_kv_heads(family):
  with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by num_kv_heads=3"):
    FROM_SIZE[family](num_kv_heads=3)
  with pytest.raises(ValueError, match="num_kv_heads"):
    FROM_SIZE[family](num_kv_heads=0)
  assert FROM_SIZE[family](num_kv_heads=2).kv_heads == 2
  assert FROM_SIZE[family]().kv_heads == 4


@pytest.mark.parametrize("family", sorted(FROM_SIZE))
@pytest.mark.parametrize("field,value", [
    ("activation", "swish"), ("remat_policy", "sometimes"), ("dropout_rate", 1.0),
    ("dropout_rate", -0.1), ("dtype", "float33"), ("param_dtype", "int5"), ("num_layers", 0),
    ("d_model", -64), ("vocab_size", 0), ("d_ff", -1), ("num_heads", 0),
])
def test_bad_field_raises_value_error_naming_it(family, field, value):
  with pytest.raises(ValueError, match=field):
    FROM_SIZE[family](**{field: value})


@pytest.mark.parametrize("family,field,value", [
    ("gpt", "positions", "alibi"), ("gpt", "norm", "batchnorm"), ("gpt", "max_seq_len", 0),
    ("bert", "head", "cls"), ("bert", "type_vocab_size", 0),
    ("t5", "relative_buckets", 2), ("t5", "num_decoder_layers", 0),
])
def test_family_specific_bad_field(family, field, value):
  with pytest.raises(ValueError, match=field):
    FROM_SIZE[family](**{field: value})


@pytest.mark.parametrize("cls", [GPTConfig, BertConfig, T5Config])
def test_unknown_activation_names_the_field_and_lists_known_ones(cls):
  with pytest.raises(ValueError, match=rf"{cls.__name__}\.activation='swish'.*gelu_tanh"):
    cls.from_size("tiny", activation="swish")


@pytest.mark.parametrize("cls", [GPTConfig, BertConfig, T5Config])
def test_unknown_size_name(cls):
  with pytest.raises(ValueError, match=r"size 'huge'.*tiny"):
    cls.from_size("huge")


def test_replace_validates_and_configs_are_frozen():
  cfg = GPTConfig.from_size("tiny")
  with pytest.raises(ValueError, match="num_kv_heads"):
    cfg.replace(num_kv_heads=3)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 128  # type: ignore[misc]
  assert cfg.replace(num_layers=3).num_layers == 3 and cfg.num_layers == 2


# --------------------------------------------------------------------------------------
# Bad inputs at apply time (raised before any computation; params come from eval_shape)


def _abstract_params(model, *args):
  return jax.eval_shape(lambda: model.init(KEY(0), *args))["params"]


def _fails_at_apply(model, params, *args, match, **kw):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda p: model.apply({"params": p}, *args, **kw), params)


def test_gpt_sequence_longer_than_learned_positions():
  model = GPT(GPTConfig.from_size("tiny", max_seq_len=16))
  params = _abstract_params(model, jnp.zeros((1, 16), jnp.int32))
  _fails_at_apply(model, params, jnp.zeros((1, 17), jnp.int32),
                  match=r"sequence length 17 exceeds GPTConfig.max_seq_len=16")
  # Rotary positions have no table: longer sequences are fine.
  rope = GPT(GPTConfig.from_size("tiny", max_seq_len=16, positions="rope"))
  rope_params = _abstract_params(rope, jnp.zeros((1, 16), jnp.int32))
  out = jax.eval_shape(lambda p: rope.apply({"params": p}, jnp.zeros((1, 40), jnp.int32)),
                       rope_params)
  assert out.shape == (1, 40, 256)


def test_bert_sequence_longer_than_learned_positions():
  model = Bert(BertConfig.from_size("tiny", max_seq_len=16))
  params = _abstract_params(model, jnp.zeros((1, 16), jnp.int32))
  _fails_at_apply(model, params, jnp.zeros((1, 17), jnp.int32),
                  match=r"sequence length 17 exceeds BertConfig.max_seq_len=16")


def test_mismatched_segment_ids_and_token_types_shapes():
  tok = jnp.zeros((2, 8), jnp.int32)
  bad = jnp.ones((2, 7), jnp.int32)
  gpt = GPT(GPTConfig.from_size("tiny"))
  gpt_params = _abstract_params(gpt, tok)
  _fails_at_apply(gpt, gpt_params, tok, segment_ids=bad, match=r"segment_ids has shape \(2, 7\)")
  _fails_at_apply(gpt, gpt_params, tok, positions=bad, match="positions")
  _fails_at_apply(gpt, gpt_params, tok[0], match=r"\[batch, length\]")
  bert = Bert(BertConfig.from_size("tiny"))
  bert_params = _abstract_params(bert, tok)
  _fails_at_apply(bert, bert_params, tok, segment_ids=bad, match="segment_ids")
  _fails_at_apply(bert, bert_params, tok, token_types=bad, match="token_types")
  t5 = T5(T5Config.from_size("tiny"))
  t5_params = _abstract_params(t5, tok, tok[:, :5])
  _fails_at_apply(t5, t5_params, tok, tok[:, :5], encoder_segment_ids=bad,
                  match="encoder_segment_ids")
  _fails_at_apply(t5, t5_params, tok, tok[:, :5], decoder_segment_ids=bad,
                  match="decoder_segment_ids")


def test_t5_encoder_segment_ids_must_match_encoder_not_decoder():
  """Encoder and decoder lengths differ; the encoder ids have the encoder's shape."""
  enc, dec = jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32)
  t5 = T5(T5Config.from_size("tiny"))
  params = _abstract_params(t5, enc, dec)
  out = jax.eval_shape(lambda p: t5.apply({"params": p}, enc, dec,
                                         encoder_segment_ids=jnp.ones((2, 8), jnp.int32),
                                         decoder_segment_ids=jnp.ones((2, 5), jnp.int32)), params)
  assert out.shape == (2, 5, 256) and out.dtype == jnp.float32


# --------------------------------------------------------------------------------------
# Named sizes and parameter counts


def test_named_sizes():
  assert GPTConfig() == GPTConfig.from_size("small")
  medium = GPTConfig.from_size("medium")
  assert (medium.d_model, medium.num_layers, medium.num_heads) == (1024, 24, 16)
  xl = GPTConfig.from_size("xl")
  assert (xl.d_model, xl.num_layers, xl.num_heads, xl.k) == (1600, 48, 25, 64)
  assert GPTConfig.from_size("small", d_ff=1000).d_ff == 1000
  assert BertConfig() == BertConfig.from_size("base")
  large = BertConfig.from_size("large")
  assert (large.d_model, large.num_layers, large.num_heads, large.d_ff) == (1024, 24, 16, 4096)
  assert T5Config() == T5Config.from_size("small")
  small = T5Config.from_size("small")
  assert (small.activation, small.gated, small.tie_embeddings, small.k) == ("relu", False, True, 64)
  v11 = T5Config.from_size("v1_1-small")
  assert (v11.k, v11.num_heads, v11.tie_embeddings) == (64, 6, False)
  assert (v11.d_model, v11.num_layers, v11.decoder_layers, v11.d_ff) == (512, 8, 8, 1024)
  assert (v11.activation, v11.gated) == ("gelu_tanh", True)
  assert T5Config.from_size("v1_1-base", num_decoder_layers=4).decoder_layers == 4


def _count(model, *args):
  shapes = jax.eval_shape(lambda: model.init(KEY(0), *args)["params"])
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


TOK = jnp.zeros((1, 4), jnp.int32)


@pytest.mark.parametrize("model,args,expected", [
    (GPT(GPTConfig.from_size("small")), (TOK,), 124_439_808),
    (GPT(GPTConfig.from_size("medium")), (TOK,), 354_823_168),
    (Bert(BertConfig.from_size("base", pooler=True, head="none")), (TOK,), 109_482_240),
    (T5(T5Config.from_size("small")), (TOK, TOK), 60_506_624),
    (T5(T5Config.from_size("v1_1-small")), (TOK, TOK), 76_961_152),
], ids=["gpt2", "gpt2-medium", "bert-base", "t5-small", "t5-v1_1-small"])
def test_parameter_counts_match_hugging_face(model, args, expected):
  assert _count(model, *args) == expected


def _mlp_in_kernel_shape(cfg):
  shapes = jax.eval_shape(lambda: nn.unbox(GPT(cfg).init(KEY(0), TOK)["params"]))
  return shapes["layers_0"]["mlp"]["wi"]["kernel"].shape


def test_default_d_ff_follows_d_model_after_replace():
  """d_ff=0 means 4 * d_model; replacing d_model on a config that never set d_ff must keep
  that meaning (small.replace(...) with medium's width is medium, 4096-wide MLP)."""
  assert _mlp_in_kernel_shape(GPTConfig.from_size("tiny", d_model=128)) == (128, 512)
  assert _mlp_in_kernel_shape(GPTConfig.from_size("tiny").replace(d_model=128)) == (128, 512)
  assert _mlp_in_kernel_shape(GPTConfig.from_size("tiny", d_ff=100).replace(d_model=128)) == (
      128, 100)  # an explicit d_ff stays


def test_scan_layers_does_not_change_parameter_count():
  cfg = GPTConfig.from_size("small", num_layers=3)
  assert _count(GPT(cfg), TOK) == _count(GPT(cfg.replace(scan_layers=True)), TOK)
