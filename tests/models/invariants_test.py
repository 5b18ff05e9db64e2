"""Invariants every model family must keep, whatever its weights.

Causality and segment isolation through exact-zero gradients; padding and packing
leave real positions unchanged; jit, layer scanning and rematerialization change no
value; dropout only acts when asked; bfloat16 compute stays close to float32.

Weights are initialized once per family and shared; examples use one fixed batch shape
per family so that tests reuse each other's compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import layers
from llmjax.models import (GPT, Bert, BertConfig, GPTConfig, T5, T5Config, stack_layers,
                           unstack_layers)

# rbg keys compile far faster on CPU than threefry, and the tests only need fixed seeds.
KEY = functools.partial(jax.random.key, impl="rbg")

CONFIGS = {
    "gpt": lambda **kw: GPTConfig.from_size("tiny", **kw),
    "gpt_rope_gqa": lambda **kw: GPTConfig.from_size("tiny", positions="rope", num_kv_heads=2,
                                                     **kw),
    "bert": lambda **kw: BertConfig.from_size("tiny", **kw),
    "t5": lambda **kw: T5Config.from_size("tiny", **kw),
}
FAMILIES = ("gpt", "bert", "t5")
MODELS = {GPTConfig: GPT, BertConfig: Bert, T5Config: T5}

# Per family: segment-id input -> the token inputs it labels. The first group is the one
# the logits are indexed by (T5: the decoder).
GROUPS = {
    GPTConfig: {"segment_ids": ("tokens",)},
    BertConfig: {"segment_ids": ("tokens", "token_types")},
    T5Config: {"decoder_segment_ids": ("decoder_tokens",),
               "encoder_segment_ids": ("encoder_tokens",)},
}
# Length of both example sequences per segment-id input (equal, so that both sequences run
# alone in one batch: one compilation fewer per family).
LENGTHS = {
    GPTConfig: {"segment_ids": 6},
    BertConfig: {"segment_ids": 6},
    T5Config: {"decoder_segment_ids": 5, "encoder_segment_ids": 7},
}
NUM_PAD = 2


def make_cfg(family, **overrides):
  return CONFIGS[family](**{"dropout_rate": 0.0, **overrides})


def _apply(cfg, params, inputs, *, method=None, **kw):
  """The family's public call form on a dict of inputs."""
  model = MODELS[type(cfg)](cfg)
  variables = {"params": params}
  if isinstance(cfg, GPTConfig):
    return model.apply(variables, inputs["tokens"], segment_ids=inputs["segment_ids"], **kw)
  if isinstance(cfg, BertConfig):
    return model.apply(variables, inputs["tokens"], segment_ids=inputs["segment_ids"],
                       token_types=inputs["token_types"], **kw)
  if method == "encode":
    return model.apply(variables, inputs["encoder_tokens"], inputs["encoder_segment_ids"],
                       method="encode", **kw)
  return model.apply(variables, inputs["encoder_tokens"], inputs["decoder_tokens"],
                     encoder_segment_ids=inputs["encoder_segment_ids"],
                     decoder_segment_ids=inputs["decoder_segment_ids"], **kw)


apply_jit = jax.jit(_apply, static_argnums=0, static_argnames=("method", "deterministic"))


@functools.cache
def init_params(family):
  """Float32, unrolled-layer parameters of the family's tiny model (one init per process)."""
  cfg = make_cfg(family)
  inputs = example(family, "padded")
  model = MODELS[type(cfg)](cfg)
  args = ((inputs["encoder_tokens"], inputs["decoder_tokens"]) if isinstance(cfg, T5Config)
          else (inputs["tokens"],))
  params = jax.jit(model.init)(KEY(0), *args)["params"]
  return nn.unbox(params)


@functools.cache
def sequences(family):
  """Two fixed random examples: per token input a 1-D int array (no padding)."""
  cfg = make_cfg(family)
  rng = np.random.default_rng(1)
  seqs = []
  for i in range(2):
    seq = {}
    for seg_name, names in GROUPS[type(cfg)].items():
      n = LENGTHS[type(cfg)][seg_name]
      for name in names:
        seq[name] = (np.repeat([0, 1], [n // 2, n - n // 2]) if name == "token_types"
                     else rng.integers(1, cfg.vocab_size, n))
    seqs.append(seq)
  return seqs


def pack(cfg, seqs, length, rng):
  """One row: seqs[0] as segment 1, seqs[1] as segment 2, ..., then padding (segment 0,
  garbage ids) up to `length[seg_name]` for each segment-id input. Arrays are [1, L]."""
  row = {}
  for seg_name, names in GROUPS[type(cfg)].items():
    segs = [np.full(len(s[names[0]]), i + 1) for i, s in enumerate(seqs)]
    pad = length[seg_name] - sum(len(s) for s in segs)
    row[seg_name] = np.concatenate(segs + [np.zeros(pad, int)])
    for name in names:
      high = cfg.type_vocab_size if name == "token_types" else cfg.vocab_size
      row[name] = np.concatenate([s[name] for s in seqs] + [rng.integers(0, high, pad)])
  return {k: jnp.asarray(v[None], jnp.int32) for k, v in row.items()}


def _stack_rows(rows):
  return {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}


def out_segment(cfg):
  """The segment-id input whose positions index the logits."""
  return next(iter(GROUPS[type(cfg)]))


@functools.cache
def example(family, kind):
  """Fixed batches of two rows.

  alone: row i is sequence i by itself, no padding.
  padded: row i is sequence i followed by garbage padding.
  packed: row 0 packs (a, b) and row 1 packs (b, a), then garbage padding.
  padded and packed have the same shape (2 * length + NUM_PAD per input).
  """
  cfg = make_cfg(family)
  seqs = sequences(family)
  rng = np.random.default_rng(2)
  length = {k: 2 * v + NUM_PAD for k, v in LENGTHS[type(cfg)].items()}
  if kind == "alone":
    return _stack_rows([pack(cfg, [s], LENGTHS[type(cfg)], rng) for s in seqs])
  if kind == "padded":
    return _stack_rows([pack(cfg, [s], length, rng) for s in seqs])
  if kind == "packed":
    return _stack_rows([pack(cfg, seqs, length, rng), pack(cfg, seqs[::-1], length, rng)])
  raise ValueError(kind)


def _alone_logits(family):
  return np.asarray(apply_jit(make_cfg(family), init_params(family), example(family, "alone")))


# --------------------------------------------------------------------------------------
# Causality and segment isolation, through exact-zero gradients.


def _perturbed_embeddings(deltas):
  """Interceptor adding deltas[i] to the output of the i-th token-embedding lookup."""
  it = iter(deltas)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (isinstance(context.module, layers.Embed) and context.method_name == "__call__"
        and context.module.name in ("wte", "token_embed")):
      out = out + next(it)
    return out

  return nn.intercept_methods(interceptor)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _position_jacobians(cfg, params, inputs, method=None):
  """d(score of output position [b, t]) / d(embedding delta [b', s, :]) for each embedded input.

  The score of a position is its logits (or hidden states) dotted with a fixed random
  vector. Returns one [B, T, B, S, D] array per token-embedding lookup, in call order.
  """
  out = jax.eval_shape(lambda: _apply(cfg, params, inputs, method=method))
  w = jax.random.normal(KEY(7), out.shape[-1:])
  names = (["encoder_tokens"] if method == "encode" else ["encoder_tokens", "decoder_tokens"]
           ) if isinstance(cfg, T5Config) else ["tokens"]
  deltas = [jnp.zeros(inputs[n].shape + (cfg.d_model,)) for n in names]

  def scores(deltas):
    with _perturbed_embeddings(deltas):
      return _apply(cfg, params, inputs, method=method) @ w

  return jax.jacrev(scores)(deltas)


def _expected_dependency(q_seg, k_seg, causal, cross=False):
  """[B, T, B, S] booleans: same row, same non-padding segment and (causal) key at or before
  query. A padding query attends to nothing: through self-attention's residual path it
  depends on its own input alone, through cross-attention on none."""
  q_seg, k_seg = np.asarray(q_seg), np.asarray(k_seg)
  B, T = q_seg.shape
  S = k_seg.shape[1]
  same = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg != 0)[:, :, None]
  if causal:
    same &= np.arange(S)[None, None, :] <= np.arange(T)[None, :, None]
  if not cross:
    same |= np.eye(T, S, dtype=bool)[None] & (q_seg == 0)[:, :, None]
  dep = np.zeros((B, T, B, S), bool)
  for b in range(B):
    dep[b, :, b, :] = same[b]
  return dep


def _assert_dependency(jac, expected):
  jac = np.abs(np.asarray(jac)).max(-1)
  assert (jac[~expected] == 0.0).all(), "an output depends on an input it must not see"
  assert (jac[expected] > 0.0).all(), "an output ignores an input it should see"


@pytest.mark.parametrize("family", ["gpt", "gpt_rope_gqa"])
def test_gpt_is_causal_within_segments(family):
  """Position t's logits have exactly zero gradient w.r.t. embeddings after t or in another
  segment (or row), and non-zero gradient w.r.t. every earlier one of its segment."""
  cfg, inputs = make_cfg(family), example(family, "packed")
  (jac,) = _position_jacobians(cfg, init_params(family), inputs)
  seg = inputs["segment_ids"]
  _assert_dependency(jac, _expected_dependency(seg, seg, causal=True))


def test_bert_is_bidirectional_within_segments():
  cfg, inputs = make_cfg("bert"), example("bert", "packed")
  (jac,) = _position_jacobians(cfg, init_params("bert"), inputs)
  seg = inputs["segment_ids"]
  _assert_dependency(jac, _expected_dependency(seg, seg, causal=False))


def test_t5_decoder_is_causal_and_encoder_bidirectional():
  cfg, inputs = make_cfg("t5"), example("t5", "packed")
  params = init_params("t5")
  enc_seg, dec_seg = inputs["encoder_segment_ids"], inputs["decoder_segment_ids"]
  jac_enc, jac_dec = _position_jacobians(cfg, params, inputs)
  _assert_dependency(jac_dec, _expected_dependency(dec_seg, dec_seg, causal=True))
  # Cross-attention: decoder segment k sees all of encoder segment k, and nothing else.
  _assert_dependency(jac_enc, _expected_dependency(dec_seg, enc_seg, causal=False, cross=True))
  # The encoder itself is bidirectional: its output at t depends on later positions too.
  (jac_encode,) = _position_jacobians(cfg, params, inputs, "encode")
  _assert_dependency(jac_encode, _expected_dependency(enc_seg, enc_seg, causal=False))


# --------------------------------------------------------------------------------------
# Padding and packing.


def _segment_slices(cfg, inputs, row):
  """{segment id: slice of output positions} for one row."""
  seg = np.asarray(inputs[out_segment(cfg)][row])
  return {s: slice(np.argmax(seg == s), len(seg) - np.argmax(seg[::-1] == s))
          for s in np.unique(seg) if s}


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_leaves_real_positions_unchanged(family):
  """Garbage padding (segment 0) after a sequence does not change its logits."""
  cfg, inputs = make_cfg(family), example(family, "padded")
  logits = np.asarray(apply_jit(cfg, init_params(family), inputs))
  alone = _alone_logits(family)
  n = alone.shape[1]
  assert (np.asarray(inputs[out_segment(cfg)])[:, n:] == 0).all()
  np.testing.assert_allclose(logits[:, :n], alone, atol=1e-5, rtol=0)
  assert np.isfinite(logits).all()  # padding positions too


@pytest.mark.parametrize("family", FAMILIES + ("gpt_rope_gqa",))
def test_packing_equals_separate_sequences(family):
  """Two sequences packed in one row (segment ids 1.., 2..) give their logits when alone.

  For BERT the examples carry token types [0.., 1..]; for T5 both the encoder and the
  decoder rows are packed with matched segment ids.
  """
  cfg, inputs = make_cfg(family), example(family, "packed")
  logits = np.asarray(apply_jit(cfg, init_params(family), inputs))
  alone = _alone_logits(family)
  for row, order in ((0, (0, 1)), (1, (1, 0))):
    slices = _segment_slices(cfg, inputs, row)
    for seg_id, i in zip((1, 2), order):
      np.testing.assert_allclose(logits[row, slices[seg_id]], alone[i], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Transformations that must not change values: jit, scan, remat.


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_equals_no_jit(family):
  cfg, inputs, params = make_cfg(family), example(family, "packed"), init_params(family)
  # T5's logits reach ~3, where 1e-6 is a few float32 ulps and XLA's fusions differ.
  np.testing.assert_allclose(apply_jit(cfg, params, inputs), _apply(cfg, params, inputs),
                             atol=5e-6, rtol=1e-6)


def _layer_groups(cfg):
  """Where the layer params live: [(path, number of layers)]."""
  if isinstance(cfg, GPTConfig):
    return [((), cfg.num_layers)]
  if isinstance(cfg, BertConfig):
    return [(("encoder",), cfg.num_layers)]
  return [(("encoder",), cfg.num_layers), (("decoder",), cfg.decoder_layers)]


def _restack(cfg, params, fn):
  params = dict(params)
  for path, n in _layer_groups(cfg):
    if not path:
      params = fn(params, n)
    else:
      params[path[0]] = fn(dict(params[path[0]]), n)
  return params


def _tree_shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), nn.unbox(tree))


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_equals_unrolled(family):
  """stack_layers turns unrolled weights into exactly the scanned model's layout, and the
  scanned model computes the same logits; unstack_layers inverts stack_layers."""
  cfg, inputs, params = make_cfg(family), example(family, "packed"), init_params(family)
  scan_cfg = cfg.replace(scan_layers=True)
  stacked = _restack(cfg, params, stack_layers)
  model = MODELS[type(cfg)](scan_cfg)
  args = ((inputs["encoder_tokens"], inputs["decoder_tokens"]) if isinstance(cfg, T5Config)
          else (inputs["tokens"],))
  scan_shapes = jax.eval_shape(lambda: model.init(KEY(0), *args)["params"])
  assert _tree_shapes(stacked) == _tree_shapes(scan_shapes)
  np.testing.assert_allclose(apply_jit(scan_cfg, stacked, inputs),
                             apply_jit(cfg, params, inputs), atol=1e-5, rtol=0)
  roundtrip = _restack(cfg, stacked, unstack_layers)
  assert jax.tree.structure(roundtrip) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, roundtrip, params)


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_grads(cfg, params, inputs):
  def loss(params):
    logits = _apply(cfg, params, inputs)
    w = jax.random.normal(KEY(3), logits.shape)
    return jnp.sum(logits * w), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def _assert_same_logits_and_grads(cfg, params, inputs, policies):
  logits, grads = _logits_and_grads(cfg, params, inputs)
  for policy in policies:
    remat_logits, remat_grads = _logits_and_grads(cfg.replace(remat_policy=policy), params,
                                                  inputs)
    np.testing.assert_allclose(remat_logits, logits, atol=1e-6, rtol=1e-6, err_msg=policy)
    assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
    # Recomputation may reassociate float sums: compare each gradient to its own scale
    # (floored, for gradients that are zero up to rounding, such as attention key biases').
    floor = 1e-4 * max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(grads))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(remat_grads),
                            jax.tree.leaves(grads)):
      a, b = np.asarray(a), np.asarray(b)
      assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), floor), (
          policy, jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_remat_changes_no_value(family):
  """remat_policy "full" and "dots" give the same logits and gradients as "none"."""
  _assert_same_logits_and_grads(make_cfg(family), init_params(family),
                                example(family, "packed"), ("full", "dots"))


def test_remat_with_scan_changes_no_value():
  cfg = make_cfg("gpt", scan_layers=True)
  _assert_same_logits_and_grads(cfg, _restack(cfg, init_params("gpt"), stack_layers),
                                example("gpt", "packed"), ("full",))


# --------------------------------------------------------------------------------------
# Dropout and dtypes.


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_only_when_not_deterministic(family):
  cfg, inputs, params = make_cfg(family), example(family, "packed"), init_params(family)
  drop_cfg = cfg.replace(dropout_rate=0.1)
  clean = np.asarray(apply_jit(cfg, params, inputs))
  # Default apply is deterministic: it ignores any dropout rng and equals the model without
  # dropout.
  default_1 = apply_jit(drop_cfg, params, inputs)
  default_2 = apply_jit(drop_cfg, params, inputs, rngs={"dropout": KEY(1)})
  np.testing.assert_array_equal(default_1, default_2)
  np.testing.assert_allclose(default_1, clean, atol=1e-6, rtol=0)

  def noisy(seed):
    return np.asarray(apply_jit(drop_cfg, params, inputs, deterministic=False,
                                rngs={"dropout": KEY(seed)}))

  noisy_1 = noisy(1)
  assert np.isfinite(noisy_1).all()
  assert np.abs(noisy_1 - clean).max() > 1e-3
  np.testing.assert_array_equal(noisy(1), noisy_1)  # the same rng drops the same units
  assert np.abs(noisy(2) - noisy_1).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_float32_params(family):
  cfg, inputs, params = make_cfg(family), example(family, "packed"), init_params(family)
  bf16_cfg = cfg.replace(dtype="bfloat16", param_dtype="float32")
  model = MODELS[type(cfg)](bf16_cfg)
  args = ((inputs["encoder_tokens"], inputs["decoder_tokens"]) if isinstance(cfg, T5Config)
          else (inputs["tokens"],))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(KEY(0), *args)["params"]))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  assert _tree_shapes(shapes) == _tree_shapes(params)
  logits = apply_jit(bf16_cfg, params, inputs)
  assert logits.dtype == jnp.float32
  ref = np.asarray(apply_jit(cfg, params, inputs))
  err = np.abs(np.asarray(logits) - ref).max()
  assert err <= 0.05 * np.abs(ref).max(), (err, np.abs(ref).max())
  assert err > 0.0  # the bfloat16 path really computed in bfloat16
