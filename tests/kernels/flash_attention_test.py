"""Tests of llmjax.kernels.flash_attention.

First the plain-jnp reference against independent implementations (a numpy loop over each
query's allowed keys; llmjax.layers.xla_attention; jax.nn.dot_product_attention), then the
Pallas kernel, in interpret mode, against the reference: outputs and gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import layers
from llmjax.kernels import flash_attention
from llmjax.kernels.buckets import relative_position_bucket
from llmjax.kernels.flash_attention import BlockSizes
from llmjax.kernels.flash_attention.reference import attention_reference, make_mask



def _normal(seed, shape):
  """Fixed-seed float32 inputs (numpy: no per-shape compilation of a jax.random kernel)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _packed_segment_ids(seed, B, L, max_segments=3):
  """[B, L] int32 as a packer writes them: runs 1, 2, ... of random lengths, then 0 padding.

  Row 0 always ends in padding, so padding queries and keys are always exercised.
  """
  rng = np.random.default_rng(seed)
  ids = np.zeros((B, L), np.int32)
  for b in range(B):
    used = L - rng.integers(1 if b == 0 else 0, L // 4 + 1)
    cuts = np.sort(rng.choice(np.arange(1, used), rng.integers(0, max_segments), replace=False))
    for segment, (start, stop) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
      ids[b, start:stop] = segment
  return jnp.asarray(ids)


def _naive_attention(q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None,
                     bias_table=None, bias_bidirectional=True, bias_max_distance=128,
                     window=None, scale=None):
  """The documented semantics spelled out per (b, h, i) in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, H, K = q.shape
  S, G = k.shape[1], k.shape[2]
  scale = K ** -0.5 if scale is None else scale
  if segment_ids is not None:
    seg_q = np.asarray(segment_ids)
    seg_kv = seg_q if kv_segment_ids is None else np.asarray(kv_segment_ids)
  if bias_table is not None:
    table = np.asarray(bias_table, np.float64)
    # The bucket function is part of the spec (checked against T5 in tests/layers).
    relative = np.arange(S)[None, :] - np.arange(T)[:, None]
    bucket = np.asarray(relative_position_bucket(
        jnp.asarray(relative, jnp.int32), bidirectional=bias_bidirectional,
        num_buckets=table.shape[0], max_distance=bias_max_distance))

  def allowed(b, i, j):
    if segment_ids is not None and (seg_q[b, i] == 0 or seg_q[b, i] != seg_kv[b, j]):
      return False
    if causal and j > i:
      return False
    if window is not None and (i - j if causal else abs(i - j)) >= window:
      return False
    return True

  out = np.zeros((B, T, H, K))
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      for i in range(T):
        keys = [j for j in range(S) if allowed(b, i, j)]
        if not keys:
          continue  # no key to attend: the output stays 0
        logits = np.array([q[b, i, h] @ k[b, j, g] * scale
                           + (table[bucket[i, j], h] if bias_table is not None else 0.0)
                           for j in keys])
        probs = np.exp(logits - logits.max())
        out[b, i, h] = (probs / probs.sum()) @ v[b, keys, g]
  return out


# ---------------------------------------------------------------------------------------------
# The reference.

B, T, K = 2, 12, 8
SEG = jnp.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0, 0],
                 [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]], jnp.int32)
# Cross-attention keys: query segment 3 of row 0 has no keys (fully masked rows).
KV_SEG = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0],
                    [1, 1, 1, 1, 2, 2, 2, 2, 2]], jnp.int32)

REFERENCE_CASES = {
    "bidirectional": dict(),
    "causal": dict(causal=True),
    "packed_segments_with_padding": dict(segment_ids=SEG),
    "causal_packed_segments": dict(causal=True, segment_ids=SEG),
    "gqa_4_heads_2_groups": dict(H=4, G=2, causal=True, segment_ids=SEG),
    "mqa_4_heads_1_group": dict(H=4, G=1, segment_ids=SEG),
    "bias_bidirectional": dict(H=4, G=2, bias=(8, 4, True)),
    "bias_causal_bucketing": dict(causal=True, bias=(8, 6, False)),
    "bias_32_buckets_max_distance_16": dict(H=4, G=4, bias=(32, 16, True), segment_ids=SEG),
    "window_causal": dict(causal=True, window=3),
    "window_bidirectional": dict(window=2, segment_ids=SEG),
    "window_1_is_diagonal": dict(window=1),
    "cross_attention": dict(S=9, H=4, G=2, segment_ids=SEG, kv_segment_ids=KV_SEG,
                            bias=(8, 4, True)),
    "cross_attention_no_segments": dict(S=5, window=3),
    "everything_scale_1": dict(H=4, G=2, causal=True, segment_ids=SEG, bias=(16, 10, False),
                               window=4, scale=1.0),
}


def _reference_inputs(H=2, G=2, S=T, bias=None, seed=0, **kwargs):
  """q, k, v and the keyword arguments of attention_reference for one case."""
  q, k, v = (_normal(seed, (B, T, H, K)), _normal(seed + 1, (B, S, G, K)),
             _normal(seed + 2, (B, S, G, K)))
  if bias is not None:
    num_buckets, max_distance, bidirectional = bias
    kwargs.update(bias_table=_normal(seed + 3, (num_buckets, H)),
                  bias_max_distance=max_distance, bias_bidirectional=bidirectional)
  return q, k, v, kwargs


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_reference_matches_naive_loop(name):
  q, k, v, kwargs = _reference_inputs(**REFERENCE_CASES[name])
  out = attention_reference(q, k, v, **kwargs)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, _naive_attention(q, k, v, **kwargs), atol=1e-5, rtol=1e-5)


def test_reference_rows_without_keys_are_zero_with_zero_gradients():
  q, k, v, kwargs = _reference_inputs(**REFERENCE_CASES["cross_attention"])
  out, vjp = jax.vjp(lambda q, k, v, t: attention_reference(q, k, v, **{**kwargs, "bias_table": t}),
                     q, k, v, kwargs["bias_table"])
  # Row 0: segment-3 queries (no such keys) and padding queries; row 1 has keys for all.
  empty_T = np.asarray(SEG[0] == 3) | np.asarray(SEG[0] == 0)
  assert empty_T.sum() == 5
  np.testing.assert_array_equal(out[0, empty_T], 0.0)
  assert np.all(np.abs(np.asarray(out[0, ~empty_T])).sum(-1) > 0)
  dq, dk, dv, dtable = vjp(_normal(9, out.shape))
  assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv, dtable))
  np.testing.assert_array_equal(dq[0, empty_T], 0.0)
  # Padding keys are never attended, so they get no gradient either.
  np.testing.assert_array_equal(dk[0, 7:], 0.0)
  np.testing.assert_array_equal(dv[0, 7:], 0.0)


def test_reference_keeps_bfloat16_and_computes_in_float32():
  q, k, v, kwargs = _reference_inputs(causal=True, segment_ids=SEG, bias=(8, 4, True))
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  out16 = attention_reference(q16, k16, v16, **kwargs)
  assert out16.dtype == jnp.bfloat16
  expected = _naive_attention(q16.astype(jnp.float32), k16.astype(jnp.float32),
                              v16.astype(jnp.float32), **kwargs)
  np.testing.assert_allclose(out16.astype(jnp.float32), expected, atol=2e-2)


def _xla_bias(bias_table, T, S, bidirectional, max_distance):
  """[1, H, T, S] the way RelativePositionBias builds it: a gather of the table by bucket."""
  relative_TS = jnp.arange(S)[None, :] - jnp.arange(T)[:, None]
  bucket_TS = layers.relative_position_bucket(relative_TS, bidirectional=bidirectional,
                                              num_buckets=bias_table.shape[0],
                                              max_distance=max_distance)
  return jnp.transpose(jnp.take(bias_table, bucket_TS, axis=0), (2, 0, 1))[None]


@pytest.mark.parametrize("name", ["bidirectional", "causal", "causal_packed_segments",
                                  "gqa_4_heads_2_groups", "mqa_4_heads_1_group",
                                  "bias_bidirectional", "bias_causal_bucketing",
                                  "bias_32_buckets_max_distance_16", "cross_attention"])
def test_reference_matches_xla_attention(name):
  q, k, v, kwargs = _reference_inputs(**REFERENCE_CASES[name])
  S = k.shape[1]
  causal = kwargs.get("causal", False)
  q_seg = kwargs.get("segment_ids", jnp.ones((B, T), jnp.int32))
  kv_seg = kwargs.get("kv_segment_ids", q_seg if S == T else jnp.ones((B, S), jnp.int32))
  bias = None
  if "bias_table" in kwargs:
    bias = _xla_bias(kwargs["bias_table"], T, S, kwargs["bias_bidirectional"],
                     kwargs["bias_max_distance"])
  expected = layers.xla_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                  causal=causal, bias=bias, scale=K ** -0.5)
  out = attention_reference(q, k, v, **kwargs)
  # One definition: rows with no key to attend (padding queries) are exactly 0 in both.
  has_keys_BT = np.asarray(make_mask(T, S, causal=causal, segment_ids=kwargs.get("segment_ids"),
                                     kv_segment_ids=kwargs.get("kv_segment_ids"))).any(-1)
  has_keys_BT = np.broadcast_to(has_keys_BT, (B, T))
  assert not np.any(np.asarray(expected)[~has_keys_BT])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,window,G", [(True, 3, 2), (False, 2, 1), (False, 5, 2)])
def test_reference_window_matches_jax_local_window(causal, window, G):
  q, k, v, _ = _reference_inputs(H=4, G=G)
  # local_window_size=(left, right) lets query i see keys i - left .. i + right.
  expected = jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="xla",
      local_window_size=(window - 1, 0 if causal else window - 1))
  out = attention_reference(q, k, v, causal=causal, window=window)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_make_mask():
  seg = jnp.array([[1, 1, 1, 2, 0]])
  mask = make_mask(5, 5, causal=True, segment_ids=seg, kv_segment_ids=None, window=2)
  assert mask.shape == (1, 5, 5) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask[0], np.array([[1, 0, 0, 0, 0],
                                                   [1, 1, 0, 0, 0],
                                                   [0, 1, 1, 0, 0],
                                                   [0, 0, 0, 1, 0],
                                                   [0, 0, 0, 0, 0]], bool))
  mask = make_mask(3, 4, causal=False, segment_ids=None, kv_segment_ids=None, window=2)
  np.testing.assert_array_equal(mask, np.array([[[1, 1, 0, 0],
                                                 [1, 1, 1, 0],
                                                 [0, 1, 1, 1]]], bool))
  kv_seg = jnp.array([[2, 2, 1, 0]])
  mask = make_mask(3, 4, causal=False, segment_ids=jnp.array([[1, 2, 0]]),
                   kv_segment_ids=kv_seg, window=None)
  np.testing.assert_array_equal(mask, np.array([[[0, 0, 1, 0],
                                                 [1, 1, 0, 0],
                                                 [0, 0, 0, 0]]], bool))


def _bad_inputs(change):
  """Valid inputs (B=2, T=S=12, H=4, G=2, K=8), then one thing broken by `change`."""
  args = dict(q=jnp.zeros((B, T, 4, K)), k=jnp.zeros((B, T, 2, K)), v=jnp.zeros((B, T, 2, K)))
  kwargs = dict(segment_ids=SEG, bias_table=jnp.zeros((8, 4)))
  change(args, kwargs)
  return args, kwargs


REFERENCE_BAD_INPUTS = {
    "q_rank_3": (lambda a, kw: a.update(q=jnp.zeros((B, T, 4 * K))), "rank"),
    "heads_not_multiple_of_groups": (lambda a, kw: a.update(q=jnp.zeros((B, T, 3, K))),
                                     "heads"),
    "batch_mismatch": (lambda a, kw: a.update(k=jnp.zeros((1, T, 2, K)),
                                              v=jnp.zeros((1, T, 2, K))), "batch"),
    "head_dim_mismatch": (lambda a, kw: a.update(k=jnp.zeros((B, T, 2, 4)),
                                                 v=jnp.zeros((B, T, 2, 4))), "head dim"),
    "k_v_length_mismatch": (lambda a, kw: a.update(v=jnp.zeros((B, T + 1, 2, K))), "k and v"),
    "segment_ids_shape": (lambda a, kw: kw.update(segment_ids=SEG[:, :-1]), "segment_ids"),
    "kv_segment_ids_shape": (lambda a, kw: kw.update(kv_segment_ids=SEG[:1]), "kv_segment_ids"),
    "kv_segment_ids_alone": (lambda a, kw: kw.update(segment_ids=None, kv_segment_ids=SEG),
                             "without segment_ids"),
    "cross_attention_needs_kv_segment_ids": (
        lambda a, kw: a.update(k=jnp.zeros((B, 5, 2, K)), v=jnp.zeros((B, 5, 2, K))),
        "kv_segment_ids is required"),
    "bias_table_heads": (lambda a, kw: kw.update(bias_table=jnp.zeros((8, 2))), "bias_table"),
    "bias_table_rank": (lambda a, kw: kw.update(bias_table=jnp.zeros((8,))), "bias_table"),
    "bias_max_distance_too_small": (lambda a, kw: kw.update(bias_max_distance=2),
                                    "bias_max_distance"),
    "bias_table_too_few_buckets": (lambda a, kw: kw.update(bias_table=jnp.zeros((3, 4))),
                                   "buckets"),
    "window_0": (lambda a, kw: kw.update(window=0), "window"),
}


@pytest.mark.parametrize("name", REFERENCE_BAD_INPUTS)
def test_reference_rejects_bad_inputs(name):
  change, match = REFERENCE_BAD_INPUTS[name]
  args, kwargs = _bad_inputs(change)
  with pytest.raises(ValueError, match=match):
    attention_reference(args["q"], args["k"], args["v"], **kwargs)


# ---------------------------------------------------------------------------------------------
# The kernel against the reference.

@dataclasses.dataclass(frozen=True)
class Case:
  B: int
  T: int
  S: int
  H: int
  G: int
  K: int
  seed: int
  causal: bool = False
  segments: bool = False  # packed segment ids with trailing padding
  cross_segments: bool = False  # separate kv_segment_ids (needed when S != T)
  bias: tuple[int, int, bool] | None = None  # (num_buckets, max_distance, bidirectional)
  window: int | None = None
  block: int | None = None  # block_q = block_kv; None: the kernel's defaults
  scale: float | None = None
  dtype: str = "float32"
  blocks: tuple | None = None  # (name, size) pairs of BlockSizes, overriding `block`
  scrambled: bool = False  # segment ids in no order, with padding in mid-row
  padded_tail: int = 0  # padding positions at the end of every row (whole blocks of it)

  def __str__(self):
    parts = [f"B{self.B}T{self.T}S{self.S}H{self.H}G{self.G}K{self.K}",
             "causal" if self.causal else "bidir", self.dtype]
    parts += ["seg"] * self.segments + ["kvseg"] * self.cross_segments
    if self.bias:
      parts.append("bias{}-{}-{}".format(self.bias[0], self.bias[1],
                                         "bidir" if self.bias[2] else "causal"))
    parts += [f"window{self.window}"] * (self.window is not None)
    parts += [f"block{self.block}"] * (self.block is not None)
    parts += [f"scale{self.scale}"] * (self.scale is not None)
    if self.blocks is not None:
      parts.append("blocks" + "_".join(str(v) for _, v in self.blocks))
    parts += ["scrambled"] * self.scrambled + [f"pad{self.padded_tail}"] * bool(self.padded_tail)
    return "-".join(parts)


KERNEL_CASES = [
    Case(B=1, T=128, S=128, H=2, G=2, K=64, seed=1),
    Case(B=2, T=256, S=256, H=4, G=1, K=128, seed=2, causal=True),
    Case(B=2, T=200, S=200, H=4, G=2, K=64, seed=3, causal=True, segments=True, block=128),
    Case(B=1, T=72, S=72, H=2, G=1, K=64, seed=4, segments=True, block=64),
    Case(B=2, T=128, S=128, H=4, G=2, K=64, seed=5, segments=True, bias=(32, 128, True),
         scale=0.5),
    Case(B=1, T=256, S=256, H=2, G=2, K=128, seed=6, causal=True, bias=(8, 16, False), block=64),
    Case(B=1, T=200, S=200, H=2, G=1, K=64, seed=7, causal=True, segments=True, window=48,
         block=64),
    Case(B=2, T=128, S=128, H=4, G=4, K=64, seed=8, segments=True, bias=(32, 16, True),
         window=17),
    Case(B=2, T=72, S=200, H=4, G=2, K=64, seed=9, segments=True, cross_segments=True,
         bias=(8, 128, True), block=64),
    Case(B=2, T=256, S=256, H=4, G=2, K=128, seed=10, causal=True, segments=True,
         bias=(32, 128, False), dtype="bfloat16"),
    Case(B=1, T=200, S=200, H=2, G=1, K=64, seed=11, window=64, block=64, dtype="bfloat16"),
    Case(B=1, T=128, S=128, H=4, G=2, K=64, seed=12, segments=True, bias=(8, 16, True),
         block=64, dtype="bfloat16"),
    # Cross-attention lengths with causal (j <= i from the top left) and with a window.
    Case(B=1, T=72, S=136, H=2, G=1, K=64, seed=13, causal=True, segments=True,
         cross_segments=True, block=64),
    Case(B=2, T=136, S=72, H=2, G=2, K=64, seed=14, window=20, block=32),
    # Segment ids in no order with padding inside rows: block ranges only skip less.
    Case(B=2, T=160, S=160, H=2, G=1, K=64, seed=15, causal=True, segments=True, scrambled=True,
         block=32),
    # Unequal forward blocks, separate backward blocks, and two whole blocks of padding.
    Case(B=1, T=192, S=192, H=4, G=2, K=64, seed=16, segments=True, padded_tail=64,
         bias=(16, 64, True),
         blocks=(("block_q", 32), ("block_kv", 64), ("block_q_dq", 64), ("block_kv_dq", 32),
                 ("block_q_dkv", 16), ("block_kv_dkv", 64))),
]


def _random_cases(count: int, seed: int = 2026) -> list[Case]:
  """Shapes and features drawn at random (seeded): whatever the hand-picked list misses."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(count):
    H = int(rng.choice([2, 4]))
    T = int(rng.integers(24, 220))
    cross = bool(rng.random() < 0.3)
    bias = None
    if rng.random() < 0.5:
      bias = (int(rng.choice([8, 16, 32])), int(rng.choice([20, 64, 128])), bool(rng.random() < 0.5))
    cases.append(Case(
        B=int(rng.integers(1, 3)), T=T, S=int(rng.integers(24, 220)) if cross else T, H=H,
        G=int(rng.choice([g for g in (1, 2, 4) if H % g == 0])), K=int(rng.choice([64, 128])),
        seed=100 + i, causal=bool(rng.random() < 0.5), segments=True, cross_segments=cross,
        bias=bias, window=int(rng.integers(8, 96)) if rng.random() < 0.3 else None,
        block=int(rng.choice([16, 32, 64, 128])),
        dtype="bfloat16" if rng.random() < 0.25 else "float32"))
  return cases


KERNEL_CASES += _random_cases(6)

TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def _kernel_inputs(case):
  """q, k, v, cotangent (in the case's dtype), bias table (float32) and static kwargs."""
  dtype = jnp.dtype(case.dtype)
  s = case.seed * 10
  q = _normal(s, (case.B, case.T, case.H, case.K)).astype(dtype)
  k = _normal(s + 1, (case.B, case.S, case.G, case.K)).astype(dtype)
  v = _normal(s + 2, (case.B, case.S, case.G, case.K)).astype(dtype)
  cotangent = _normal(s + 3, (case.B, case.T, case.H, case.K)).astype(dtype)
  table = None if case.bias is None else _normal(s + 4, (case.bias[0], case.H))
  kwargs = dict(causal=case.causal, window=case.window, scale=case.scale)
  if case.segments:
    kwargs["segment_ids"] = _packed_segment_ids(s + 5, case.B, case.T)
    if case.cross_segments:
      kwargs["kv_segment_ids"] = _packed_segment_ids(s + 6, case.B, case.S)
    if case.scrambled:  # the same ids, shuffled along each row
      rng = np.random.default_rng(s + 7)
      kwargs["segment_ids"] = jnp.asarray(rng.permuted(np.asarray(kwargs["segment_ids"]), axis=1))
    if case.padded_tail:
      kwargs["segment_ids"] = kwargs["segment_ids"].at[:, -case.padded_tail:].set(0)
  if case.bias is not None:
    kwargs.update(bias_max_distance=case.bias[1], bias_bidirectional=case.bias[2])
  return q, k, v, cotangent, table, kwargs


def _out_and_grads(attention, q, k, v, table, cotangent):
  """attention(q, k, v, table) and the gradients of <out, cotangent> w.r.t. q, k, v, table."""
  out, vjp = jax.vjp(attention, q, k, v, table)
  return out, vjp(cotangent)


def check_kernel(case, block: int | None, **options):
  """The kernel (interpreted, with `options`) matches the reference on `case`: output and
  every gradient within the dtype's tolerance."""
  q, k, v, cotangent, table, kwargs = _kernel_inputs(case)
  block_sizes = None if block is None else BlockSizes(block_q=block, block_kv=block)
  if case.blocks is not None and block == case.block:
    block_sizes = BlockSizes(**dict(case.blocks))

  def kernel(q, k, v, table):
    return flash_attention(q, k, v, bias_table=table, block_sizes=block_sizes, interpret=True,
                           **options, **kwargs)

  def reference(q, k, v, table):
    return attention_reference(q, k, v, bias_table=table, **kwargs)

  out, grads = jax.jit(functools.partial(_out_and_grads, kernel))(q, k, v, table, cotangent)
  # The reference sees the same (rounded) inputs, in float32.
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  out_ref, grads_ref = jax.jit(functools.partial(_out_and_grads, reference))(
      f32(q), f32(k), f32(v), table, f32(cotangent))

  tol = TOLERANCE[case.dtype]
  assert out.shape == q.shape and out.dtype == q.dtype
  out_error = float(jnp.max(jnp.abs(f32(out) - out_ref)))
  assert out_error <= tol, f"output: max abs error {out_error:.3g} > {tol}"
  for name, grad, grad_ref, x in zip(("dq", "dk", "dv", "dbias_table"), grads, grads_ref,
                                     (q, k, v, table)):
    if x is None:
      assert grad is None, name
      continue
    assert grad.shape == x.shape and grad.dtype == x.dtype, name
    # Absolute in float32, except the bias table's: each entry sums ds over every position
    # of its bucket (entries reach ~30), where float32 summation alone differs by ~1e-5.
    # bfloat16 is relative past 1: its rounding alone is up to 0.016 for values in [4, 8).
    relative = name == "dbias_table" or case.dtype == "bfloat16"
    magnitude = max(1.0, float(jnp.max(jnp.abs(grad_ref)))) if relative else 1.0
    error = float(jnp.max(jnp.abs(f32(grad) - grad_ref))) / magnitude
    assert error <= tol, f"{name}: max abs error / {magnitude:.3g} = {error:.3g} > {tol}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_kernel_matches_reference(case):
  check_kernel(case, case.block)


def test_kernel_cases_cover_every_feature():
  """Guards the case list against edits that drop a feature from the kernel tests."""
  def some(pred):
    return any(pred(c) for c in KERNEL_CASES)
  assert some(lambda c: c.causal) and some(lambda c: not c.causal)
  assert some(lambda c: c.segments and c.causal) and some(lambda c: c.cross_segments)
  assert some(lambda c: c.H > c.G > 1) and some(lambda c: c.G == 1 < c.H)
  assert some(lambda c: c.bias and c.bias[2]) and some(lambda c: c.bias and not c.bias[2])
  assert some(lambda c: c.window and c.causal) and some(lambda c: c.window and not c.causal)
  assert some(lambda c: c.block and c.T % c.block) and some(lambda c: c.block is None)
  assert some(lambda c: c.T != c.S)
  assert {c.K for c in KERNEL_CASES} == {64, 128} and {c.B for c in KERNEL_CASES} == {1, 2}
  assert {c.dtype for c in KERNEL_CASES} == {"float32", "bfloat16"}
  assert all(c.T <= 256 and c.S <= 256 and c.H <= 4 for c in KERNEL_CASES)


def _small_kernel_call(H=2, K=64, **kwargs):
  q, k, v = jnp.zeros((1, 128, H, K)), jnp.zeros((1, 128, 2, K)), jnp.zeros((1, 128, 2, K))
  return flash_attention(q, k, v, interpret=True, **kwargs)


# BlockSizes may refuse a bad block itself or leave it to flash_attention: either passes.
KERNEL_BAD_INPUTS = {
    "block_q_100": (lambda: _small_kernel_call(block_sizes=BlockSizes(block_q=100)), "block"),
    "head_dim_48": (lambda: _small_kernel_call(K=48), "head dim"),
    "heads_not_multiple_of_groups": (lambda: _small_kernel_call(H=3), "heads"),
    "segment_ids_shape": (
        lambda: _small_kernel_call(segment_ids=jnp.ones((1, 127), jnp.int32)), "segment"),
}


@pytest.mark.parametrize("name", KERNEL_BAD_INPUTS)
def test_kernel_rejects_bad_inputs(name):
  call, match = KERNEL_BAD_INPUTS[name]
  with pytest.raises(ValueError, match=f"(?i){match}"):
    call()


SPAN_CASES = {  # flash_attention's options, block_q, block_kv; T = S = 256, two rows
    "causal_segments": (dict(causal=True, segment_ids=True), 32, 64),
    "window_bidirectional": (dict(window=40, segment_ids=True), 32, 32),
    "causal_window_bias": (dict(causal=True, window=150, bias=(8, 16, False)), 16, 32),
    "bias_bidirectional_segments": (dict(bias=(16, 32, True), segment_ids=True), 32, 16),
    "scrambled_segments": (dict(causal=True, segment_ids="scrambled"), 32, 32),
}


@pytest.mark.parametrize("name", SPAN_CASES)
def test_block_spans_hold_the_visible_blocks_and_the_first_run_of_fast_ones(name):
  """common.spans against the mask and the buckets built position by position: each row of
  blocks spans every block it may see (only those, for packed segments), and its fast run is
  the first maximal run of blocks whose mask is all true and whose T5 bucket is one."""
  from llmjax.kernels import buckets
  from llmjax.kernels.flash_attention import common
  options, bq, bk = SPAN_CASES[name]
  options = dict(options)
  T, bias = 256, options.pop("bias", None)
  seg = options.pop("segment_ids", None)
  ids = _packed_segment_ids(7, 2, T, max_segments=4) if seg else jnp.ones((2, T), jnp.int32)
  if seg == "scrambled":
    ids = jnp.asarray(np.random.default_rng(8).permuted(np.asarray(ids), axis=1))
  st = common.Static(
      causal=options.get("causal", False), window=options.get("window"), scale=1.0,
      num_buckets=bias[0] if bias else 0, bias_bidirectional=bool(bias and bias[2]),
      block_q=bq, block_kv=bk, block_q_dq=bq, block_kv_dq=bk, block_q_dkv=bq, block_kv_dkv=bk,
      interpret=True, bucket_thresholds=buckets.distance_thresholds(
          bidirectional=bias[2], num_buckets=bias[0], max_distance=bias[1]) if bias else ())
  mask = np.asarray(make_mask(T, T, segment_ids=ids, **options))
  mask = mask.reshape(2, T // bq, bq, T // bk, bk)
  one_bucket = np.ones((T // bq, T // bk), bool)
  if bias:
    relative = jnp.arange(T)[None, :] - jnp.arange(T)[:, None]
    bucket = np.asarray(buckets.relative_position_bucket(
        relative, bidirectional=bias[2], num_buckets=bias[0], max_distance=bias[1]))
    bucket = bucket.reshape(T // bq, bq, T // bk, bk)
    one_bucket = bucket.min(axis=(1, 3)) == bucket.max(axis=(1, 3))
  visible, whole = mask.any(axis=(2, 4)), mask.all(axis=(2, 4)) & one_bucket
  spans = [np.asarray(x).reshape(2, -1) for x in common.spans(st, ids, ids, bq, bk)]
  by_kv = visible.transpose(0, 2, 1), whole.transpose(0, 2, 1)
  for (first, end, fast, fast_end), visible, whole in ((spans[:4], visible, whole),
                                                       (spans[4:], *by_kv)):
    for b, row in np.ndindex(first.shape):
      seen = np.flatnonzero(visible[b, row])
      if seg != "scrambled":
        assert (first[b, row], end[b, row]) == ((seen[0], seen[-1] + 1) if len(seen) else (0, 0))
      assert all(first[b, row] <= j < end[b, row] for j in seen)
      run = np.flatnonzero(whole[b, row])
      if not len(run):
        assert fast[b, row] == fast_end[b, row] == end[b, row]
        continue
      n = whole.shape[2]
      stop = next((j for j in range(run[0], n) if not whole[b, row, j]), n)
      assert (fast[b, row], fast_end[b, row]) == (run[0], stop), (b, row)
