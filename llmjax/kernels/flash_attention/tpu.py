"""Flash attention for TPU (Mosaic): forward, dq and dk/dv kernels over a grid of blocks.

The grid runs over (batch, head, query block, kv block) with the kv block innermost: the
online-softmax state (row max m, row sum l, output accumulator) lives in VMEM scratch across
the kv steps of one query block (the FlashAttention-2 schedule). Blocks that no query of the
block may attend (above the causal diagonal, outside the window, or of disjoint packed
segments, from per-block segment ranges prefetched to SMEM) are skipped, not computed and
zeroed; under causal masking their index maps also re-use the last visible block, so a
skipped step copies nothing from HBM. The T5 relative bias is computed per block from the
bucket table in SMEM, so no T x S bias exists anywhere, and its gradient is summed per
bucket in the dq kernel.

Layouts inside: q [B, H, T, D], k and v [B, G, S, D]; T and S padded to the blocks, with
padding marked by segment id 0. Per-row statistics are kept lane-replicated [rows, 128] and
segment ids as [B, T, 128] / [B, 8, S], the shapes Mosaic tiles natively.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llmjax.kernels.flash_attention import common
from llmjax.kernels.flash_attention.common import NEG, NT, TN, Static, dot

LANES, SUBLANES = 128, 8


def default_blocks(target: str | None, D: int, dtype, bias: bool) -> tuple[int, int]:
  """(block_q, block_kv) when BlockSizes leaves them to the target."""
  return 128, 128


def check(st: Static, D: int, dtype, R: int):
  """Refuses, in one line, blocks that do not fit the target."""


def _div(a, b: int):
  """a // b for non-negative ints, lowered without the sign handling of floor division."""
  return jax.lax.div(a, b)


def _rem(a, b: int):
  return jax.lax.rem(a, b)


def _kv_block(st: Static, i, j, bq: int, bk: int):
  """The kv block to fetch at grid step (q block i, kv block j): j, or under causal masking
  the last block block i can see, so the steps it skips re-use that block and copy nothing."""
  return jnp.minimum(j, _div(i * bq + bq - 1, bk)) if st.causal else j


def _q_block(st: Static, i, j, bq: int, bk: int, nq: int):
  """The q block to fetch at grid step (q block i, kv block j) of the dk/dv kernel: i, or
  under causal masking at least the first block that sees kv block j (within the nq)."""
  return jnp.minimum(jnp.maximum(i, _div(j * bk, bq)), nq - 1) if st.causal else i


def _lanes(x, n: int):
  """A lane-replicated [rows, 128] statistic as [rows, n]."""
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  return x[:, :n]


def _block_visible(st: Static, ranges, b, qi, kj, bq: int, bk: int):
  """Whether any query of block qi may attend any key of block kj (scalar, from SMEM)."""
  q_lo, q_hi, kv_lo, kv_hi, nq, nk = ranges
  visible = (q_lo[b * nq + qi] <= kv_hi[b * nk + kj]) & (kv_lo[b * nk + kj] <= q_hi[b * nq + qi])
  q_first, q_last = qi * bq, qi * bq + bq - 1
  k_first, k_last = kj * bk, kj * bk + bk - 1
  if st.causal:
    visible &= k_first <= q_last
  if st.window is not None:
    visible &= q_first - k_last < st.window
    if not st.causal:
      visible &= k_first - q_last < st.window
  return visible


def _mask(st: Static, qseg_ref, kvseg_ref, qi, kj, bq: int, bk: int):
  """Boolean [bq, bk]: same non-padding segment, causal and window."""
  qseg = _lanes(qseg_ref[...], bk)  # [bq, bk]
  kvseg = kvseg_ref[:1, :]  # [1, bk]
  mask = (qseg == kvseg) & (qseg != 0)
  position = common.position_mask(st, qi, kj, bq, bk)
  return mask if position is None else mask & position


def _logits(st: Static, q, k, table_ref, h, qi, kj, bq, bk):
  s = dot(q, k, NT) * st.scale
  buckets = None
  if st.num_buckets:
    buckets = common.buckets(st, qi, kj, bq, bk)
    s = s + common.bias(st, table_ref, h, buckets)
  return s, buckets


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(q_lo, q_hi, kv_lo, kv_hi, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, *rest,
                st: Static, nq: int, nk: int):
  table_ref = rest[0] if st.num_buckets else None
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest[1:] if st.num_buckets else rest
  b, h, qi, kj = (pl.program_id(i) for i in range(4))
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(kj == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  ranges = (q_lo, q_hi, kv_lo, kv_hi, nq, nk)

  @pl.when(_block_visible(st, ranges, b, qi, kj, bq, bk))
  def _step():
    s, _ = _logits(st, q_ref[...], k_ref[...], table_ref, h, qi, kj, bq, bk)
    mask = _mask(st, qseg_ref, kvseg_ref, qi, kj, bq, bk)
    s = jnp.where(mask, s, NEG)
    m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = dot(p.astype(v_ref.dtype), v_ref[...])
    acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

  @pl.when(kj == nk - 1)
  def _store():
    l = l_scr[...]
    empty = l == 0.0  # a row that may attend nothing: output 0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_scr[...] * _lanes(inv, acc_scr.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _seg_layouts(q_seg, kv_seg):
  B, T = q_seg.shape
  S = kv_seg.shape[1]
  return (jnp.broadcast_to(q_seg[:, :, None], (B, T, LANES)),
          jnp.broadcast_to(kv_seg[:, None, :], (B, SUBLANES, S)))


def _smem():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def forward(st: Static, q, k, v, q_seg, kv_seg, table):
  """(o [B, H, T, D], lse [B, H, T, 128]) for padded inputs in the kernel layout."""
  B, H, T, D = q.shape
  G, S = k.shape[1], k.shape[2]
  bq, bk = st.block_q, st.block_kv
  nq, nk, R = T // bq, S // bk, H // G
  qseg_l, kvseg_l = _seg_layouts(q_seg, kv_seg)
  in_specs = [
      pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, *_: (b, h, i, 0)),
      pl.BlockSpec((None, None, bk, D),
                   lambda b, h, i, j, *_: (b, _div(h, R), _kv_block(st, i, j, bq, bk), 0)),
      pl.BlockSpec((None, None, bk, D),
                   lambda b, h, i, j, *_: (b, _div(h, R), _kv_block(st, i, j, bq, bk), 0)),
      pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
      pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, *_: (b, 0, j)),
  ]
  args = [q, k, v, qseg_l, kvseg_l]
  if st.num_buckets:
    in_specs.append(_smem())
    args.append(table)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(B, H, nq, nk), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, *_: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0))],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, D), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name="flash_attention_fwd",
  )(*common.block_ranges(q_seg, kv_seg, bq, bk), *args)


# ------------------------------------------------------------------------------ backward


def _probs_and_ds(st, q, k, v, do, lse, di, mask, table_ref, h, qi, kj, bq, bk):
  """p = softmax probabilities and ds = d loss / d logits of one block."""
  s, buckets = _logits(st, q, k, table_ref, h, qi, kj, bq, bk)
  p = jnp.where(mask, jnp.exp(s - _lanes(lse, bk)), 0.0)
  dp = dot(do, v, NT)
  ds = p * (dp - _lanes(di, bk))
  return p, ds, buckets


def _dq_kernel(q_lo, q_hi, kv_lo, kv_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               qseg_ref, kvseg_ref, *rest, st: Static, nq: int, nk: int):
  if st.num_buckets:
    table_ref, dq_ref, dbias_ref, dq_scr, dbias_scr = rest
  else:
    (dq_ref, dq_scr), table_ref = rest, None
  b, h, qi, kj = (pl.program_id(i) for i in range(4))
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(kj == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if st.num_buckets:
      dbias_scr[...] = jnp.zeros(dbias_scr.shape, jnp.float32)

  ranges = (q_lo, q_hi, kv_lo, kv_hi, nq, nk)

  @pl.when(_block_visible(st, ranges, b, qi, kj, bq, bk))
  def _step():
    mask = _mask(st, qseg_ref, kvseg_ref, qi, kj, bq, bk)
    _, ds, buckets = _probs_and_ds(st, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                   lse_ref[...], di_ref[...], mask, table_ref, h, qi, kj, bq, bk)
    dq_scr[...] += dot(ds.astype(k_ref.dtype), k_ref[...]) * st.scale
    if st.num_buckets:  # d table[n, h] = sum of ds where the bucket is n
      lane = jax.lax.broadcasted_iota(jnp.int32, dbias_scr.shape, 1)
      update = jnp.zeros(dbias_scr.shape, jnp.float32)
      for n in range(st.num_buckets):
        update = update + jnp.where(lane == n, jnp.sum(jnp.where(buckets == n, ds, 0.0)), 0.0)
      dbias_scr[...] += update

  @pl.when(kj == nk - 1)
  def _store():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)
    if st.num_buckets:
      dbias_ref[...] = dbias_scr[...]


def _dkv_kernel(q_lo, q_hi, kv_lo, kv_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                qseg_ref, kvseg_ref, *rest, st: Static, nq: int, nk: int, R: int):
  table_ref = rest[0] if st.num_buckets else None
  dk_ref, dv_ref, dk_scr, dv_scr = rest[1:] if st.num_buckets else rest
  b, g, kj, t = (pl.program_id(i) for i in range(4))
  h, qi = g * R + _div(t, nq), _rem(t, nq)  # the innermost axis: the group's heads x q blocks
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  ranges = (q_lo, q_hi, kv_lo, kv_hi, nq, nk)

  @pl.when(_block_visible(st, ranges, b, qi, kj, bq, bk))
  def _step():
    mask = _mask(st, qseg_ref, kvseg_ref, qi, kj, bq, bk)
    q, do = q_ref[...], do_ref[...]
    p, ds, _ = _probs_and_ds(st, q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...],
                             mask, table_ref, h, qi, kj, bq, bk)
    dv_scr[...] += dot(p.astype(do.dtype), do, TN)
    dk_scr[...] += dot(ds.astype(q.dtype), q, TN) * st.scale

  @pl.when(t == R * nq - 1)
  def _store():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(st: Static, q, k, v, q_seg, kv_seg, table, o, lse, do):
  """(dq, dk, dv, d table [H, buckets] or None) in the kernel layout."""
  B, H, T, D = q.shape
  G, S = k.shape[1], k.shape[2]
  R = H // G
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, T]
  di = jnp.broadcast_to(di[..., None], (B, H, T, LANES))
  qseg_l, kvseg_l = _seg_layouts(q_seg, kv_seg)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  nb_lanes = max(LANES, -(-st.num_buckets // LANES) * LANES)

  # dq (and the bias table's gradient): kv blocks innermost.
  bq, bk = st.block_q_dq, st.block_kv_dq
  nq, nk = T // bq, S // bk
  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D),
                         lambda b, h, i, j, *_: (b, _div(h, R), _kv_block(st, i, j, bq, bk), 0))
  row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
              pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
              pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, *_: (b, 0, j))]
  args = [q, k, v, do, lse, di, qseg_l, kvseg_l]
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  scratch = [pltpu.VMEM((bq, D), jnp.float32)]
  if st.num_buckets:
    in_specs.append(_smem())
    args.append(table)
    out_specs.append(pl.BlockSpec((None, None, SUBLANES, nb_lanes),
                                  lambda b, h, i, j, *_: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, nq * SUBLANES, nb_lanes), jnp.float32))
    scratch.append(pltpu.VMEM((SUBLANES, nb_lanes), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(B, H, nq, nk), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=params, interpret=st.interpret,
      name="flash_attention_dq",
  )(*common.block_ranges(q_seg, kv_seg, bq, bk), *args)
  dq = outs[0]
  dtable = None
  if st.num_buckets:  # rows of a block's 8 sublanes are copies: take one, sum the rest
    dtable = outs[1][:, :, ::SUBLANES, :st.num_buckets].sum(axis=(0, 2))  # [H, buckets]

  # dk, dv: for each kv block, the innermost axis walks the R heads of its group x q blocks.
  bq, bk = st.block_q_dkv, st.block_kv_dkv
  nq, nk = T // bq, S // bk
  def q_index(b, g, j, t, *_):
    return (b, g * R + _div(t, nq), _q_block(st, _rem(t, nq), j, bq, bk, nq), 0)

  q_spec = pl.BlockSpec((None, None, bq, D), q_index)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_index)
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, g, j, t, *_: (b, g, j, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
              pl.BlockSpec((None, bq, LANES),
                           lambda b, g, j, t, *_: (b, _q_block(st, _rem(t, nq), j, bq, bk, nq), 0)),
              pl.BlockSpec((None, SUBLANES, bk), lambda b, g, j, t, *_: (b, 0, j))]
  args = [q, k, v, do, lse, di, qseg_l, kvseg_l]
  if st.num_buckets:
    in_specs.append(_smem())
    args.append(table)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk, R=R),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(B, G, nk, R * nq), in_specs=in_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=st.interpret, name="flash_attention_dkv",
  )(*common.block_ranges(q_seg, kv_seg, bq, bk), *args)
  return dq, dk, dv, dtable
