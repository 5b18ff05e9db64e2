"""Flash attention for TPU (Mosaic): forward, dq and dk/dv kernels over a grid of blocks.

The grid is (batch, head, query block, kv block), kv innermost: the online-softmax state stays
in VMEM scratch across a query block's kv steps (FlashAttention-2). A row steps only through
its span (common.spans, prefetched to SMEM); steps outside compute nothing and their index maps
re-use the span's edge block, so they copy nothing. The T5 bias is computed per block from the
bucket table in SMEM. Layouts: q [B, H, T, D], k and v [B, G, S, D], padded to the blocks with
segment id 0; row statistics lane-replicated [rows, 128], segment ids [B, T, 128] / [B, 8, S]
(shapes Mosaic tiles natively); the saved log-sum-exp is one lane of it, [B, H, T]."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llmjax.kernels import targets
from llmjax.kernels.flash_attention import common
from llmjax.kernels.flash_attention.common import NEG, NT, TN, Static, div, dot

LANES, SUBLANES = 128, 8
MiB = 1 << 20
SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)  # the T5 bias table, read by scalar index
KERNELS = {"forward": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"),
           "dk/dv": ("block_q_dkv", "block_kv_dkv")}
# The compiler's default scoped VMEM limit; `cap` raises it to 3/4 of the core's VMEM (the rest
# left to Mosaic and XLA), or v4's whole 16 MiB, the default there.
DEFAULT_LIMIT = {"v4": 16 * MiB, "v5e": 16 * MiB, "v5p": 16 * MiB, "v6e": 32 * MiB}
# [bq, bk] float32 temporaries per kernel: without and with T5 bias, and for float32 inputs
# more per 128 lanes of head dim (full-precision products split operands in bfloat16 parts).
# With T5 bias and rows over 256 bytes or blocks over 768 x 768, Mosaic keeps the dq kernel's
# per-bucket selects live: WIDE_DQ_BIAS (v5e, D 64 bf16: 17.8 tiles at 1024^2, 23.7 at 2048^2).
# Fitted to bound what libtpu 0.0.42.1 allocates, v4 to v6e (tests/kernels/tpu_fit_test.py).
TEMPS = {"forward": (2.25, 2.25, 1.5), "dq": (1.25, 3.5, 2.5), "dk/dv": (1.75, 1.75, 2.0)}
WIDE_DQ_BIAS = 24.0


def cap(target: str | None) -> int:
  """The most VMEM a kernel may get on `target`; None (unknown, CPU): the least of all TPUs."""
  return (min(map(cap, targets.TPUS)) if target is None else
          max(DEFAULT_LIMIT[target], targets.VMEM[target] * 3 // 4))


def vmem_need(kernel: str, bq: int, bk: int, D: int, dtype, bias: bool) -> int:
  """Bytes of scoped VMEM (an upper bound) the `kernel` of KERNELS needs at blocks bq x bk:
  its double-buffered input and output blocks, its scratch and its [bq, bk] temporaries."""
  n = jnp.dtype(dtype).itemsize
  d = -(-D // LANES) * LANES  # the lanes a row occupies
  rows = bq * LANES * 4  # a lane-replicated float32 statistic (or int32 segment ids)
  kv = 2 * bk * d * n + SUBLANES * bk * 4  # k, v and the kv segment ids
  if kernel == "forward":
    blocks, scratch = 2 * bq * d * n + 2 * rows + kv, 2 * rows + bq * d * 4
  elif kernel == "dq":
    blocks, scratch = 3 * bq * d * n + 3 * rows + kv, bq * d * 4
  else:
    blocks, scratch = 2 * bq * d * n + 3 * rows + kv + 2 * bk * d * n, 2 * bk * d * 4
  plain, biased, per_lanes = TEMPS[kernel]
  wide = kernel == "dq" and (D * n > 256 or bq * bk > 768 * 768)
  count = (WIDE_DQ_BIAS if wide else biased) if bias else plain
  temps = (count + (per_lanes * d / LANES if n == 4 else 0)) * bq * bk * 4
  return int(2 * blocks + scratch + temps) + MiB // 4


def _need(st: Static, kernel: str, D: int, dtype) -> tuple[int, int, int]:
  """(bq, bk, VMEM bytes) of `kernel` at st's blocks."""
  bq, bk = (getattr(st, name) for name in KERNELS[kernel])
  return bq, bk, vmem_need(kernel, bq, bk, D, dtype, st.num_buckets > 0)


def compiler_params(st: Static, kernel: str, D: int, dtype):
  """Mosaic's settings: the grid's last axis sequential, the VMEM limit raised to the need."""
  need, default = _need(st, kernel, D, dtype)[2], DEFAULT_LIMIT.get(st.target, 16 * MiB)
  limit = None if need <= default else -(-need // MiB) * MiB
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                   "arbitrary"), vmem_limit_bytes=limit)


def default_blocks(target: str | None, D: int, dtype, bias: bool) -> tuple[int, ...]:
  """The six BlockSizes: per kernel 512 x 512 (as splash attention) if it fits, else 256 or 128."""
  def fitting(kernel):
    return next((b for b in (512, 256) if vmem_need(kernel, b, b, D, dtype, bias)
                 <= cap(target)), 128)
  return tuple(b for kernel in KERNELS for b in (fitting(kernel),) * 2)


def check(st: Static, D: int, dtype):
  """Refuses, in one line, blocks whose kernels would need more VMEM than `cap` allows."""
  limit = cap(st.target)
  for name in KERNELS:
    bq, bk, need = _need(st, name, D, dtype)
    if need > limit:
      q, kv = KERNELS[name]
      where = st.target or "the smallest TPU (target None)"
      raise ValueError(
          f"BlockSizes {q}={bq}, {kv}={bk}: the {name} kernel would need {need / MiB:.1f} MiB "
          f"of VMEM (head dim {D}, {jnp.dtype(dtype).name}{', T5 bias' if st.num_buckets else ''}"
          f"), over {where}'s {limit / MiB:.0f} MiB; use smaller blocks")


def _fetched(spans, row, j):
  """Step j's block: j clamped into the row's span [first, end), so steps outside copy nothing."""
  return jnp.minimum(jnp.maximum(j, spans[0][row]), jnp.maximum(spans[1][row] - 1, 0))


def _steps(spans, row, j, step):
  """Runs step(fast) at step j of a row: step(True) in its run of fast blocks (no mask, one
  bias bucket), step(False) at its other visible blocks (common.spans)."""
  first, end, fast_first, fast_end = (x[row] for x in spans)
  fast = (fast_first <= j) & (j < fast_end)
  pl.when(fast)(functools.partial(step, True))
  pl.when((first <= j) & (j < end) & jnp.logical_not(fast))(functools.partial(step, False))


def _lanes(x, n: int):
  """A lane-replicated [rows, 128] statistic as [rows, n]."""
  return jnp.tile(x, (1, n // LANES)) if n % LANES == 0 else x[:, :n]


def _mask(st: Static, qseg_ref, kvseg_ref, qi, kj, bq: int, bk: int, fast: bool):
  """Boolean [bq, bk]: same non-padding segment, causal and window; None in a fast block."""
  if fast:
    return None
  qseg = _lanes(qseg_ref[...], bk)  # [bq, bk]
  mask = (qseg == kvseg_ref[:1, :]) & (qseg != 0)  # kv segment ids: [1, bk]
  if st.causal or st.window is not None:
    row = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    col = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if st.causal:
      mask = mask & (col <= row)
    if st.window is not None:
      mask = mask & ((row - col if st.causal else jnp.maximum(row - col, col - row)) < st.window)
  return mask


def _where(mask, x, other):
  return x if mask is None else jnp.where(mask, x, other)


def _logits(st: Static, q, k, table_ref, h, qi, kj, bq, bk, fast: bool):
  """The block's scaled logits with the T5 bias, and its buckets (one scalar if fast)."""
  s = dot(q, k, NT) * st.scale
  buckets = None
  if st.num_buckets and fast:
    buckets = common.bucket_of(st, kj * bk - qi * bq)
    s = s + table_ref[h, buckets]
  elif st.num_buckets:
    buckets = common.buckets(st, qi, kj, bq, bk)
    bias = jnp.zeros(buckets.shape, jnp.float32)
    for n in range(st.num_buckets):  # table[h, bucket], as selects over the few buckets
      bias = jnp.where(buckets == n, table_ref[h, n], bias)
    s = s + bias
  return s, buckets


def _fwd_kernel(*refs, st: Static, nq: int, nk: int):
  spans, (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref), rest = refs[:4], refs[4:9], refs[9:]
  table_ref = rest[0] if st.num_buckets else None
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest[1:] if st.num_buckets else rest
  b, h, qi, kj = (pl.program_id(i) for i in range(4))
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(kj == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(fast):
    s, _ = _logits(st, q_ref[...], k_ref[...], table_ref, h, qi, kj, bq, bk, fast)
    mask = _mask(st, qseg_ref, kvseg_ref, qi, kj, bq, bk, fast)
    s = _where(mask, s, NEG)
    m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = _where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = dot(p.astype(v_ref.dtype), v_ref[...])
    acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

  _steps(spans, b * nq + qi, kj, step)

  @pl.when(kj == nk - 1)
  def _store():
    l = l_scr[...]
    empty = l == 0.0  # a row that may attend nothing: output 0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_scr[...] * _lanes(inv, acc_scr.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _seg_layouts(q_seg, kv_seg):
  (B, T), S = q_seg.shape, kv_seg.shape[1]
  return (jnp.broadcast_to(q_seg[:, :, None], (B, T, LANES)),
          jnp.broadcast_to(kv_seg[:, None, :], (B, SUBLANES, S)))


def _q_specs(bq: int, bk: int, D: int, R: int, nq: int):
  """BlockSpecs of the forward and dq grid (b, h, q block i, kv step j): [bq, D] rows of q,
  [bk, D] of k or v (within i's span), [bq, 128] row statistics, q and kv segment ids."""
  return (pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, *_: (b, h, i, 0)),
          pl.BlockSpec((None, None, bk, D), lambda b, h, i, j, *spans: (
              b, div(h, R), _fetched(spans, b * nq + i, j), 0)),
          pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0)),
          [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0)),
           pl.BlockSpec((None, SUBLANES, bk),
                        lambda b, h, i, j, *spans: (b, 0, _fetched(spans, b * nq + i, j)))])


def forward(st: Static, q, k, v, q_seg, kv_seg, table):
  """(o [B, H, T, D], lse [B, H, T]) for padded inputs in the kernel layout."""
  (B, H, T, D), (G, S) = q.shape, k.shape[1:3]
  bq, bk = st.block_q, st.block_kv
  nq, nk, R = T // bq, S // bk, H // G
  q_spec, kv_spec, row_spec, seg_specs = _q_specs(bq, bk, D, R, nq)
  in_specs = [q_spec, kv_spec, kv_spec, *seg_specs]
  args = [q, k, v, *_seg_layouts(q_seg, kv_seg)]
  if st.num_buckets:
    in_specs.append(SMEM)
    args.append(table)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(B, H, nq, nk), in_specs=in_specs, out_specs=[q_spec, row_spec],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, D), jnp.float32)])
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T, LANES), jnp.float32)],
      compiler_params=compiler_params(st, "forward", D, q.dtype),
      interpret=st.interpret, name="flash_attention_fwd",
  )(*common.spans(st, q_seg, kv_seg, bq, bk)[:4], *args)
  return o, lse[..., 0]  # the residual kept for the backward: one lane


def _probs_and_ds(st, q, k, v, do, lse, di, mask, table_ref, h, qi, kj, bq, bk, fast):
  """p = softmax probabilities and ds = d loss / d logits of one block."""
  s, buckets = _logits(st, q, k, table_ref, h, qi, kj, bq, bk, fast)
  p = _where(mask, jnp.exp(s - _lanes(lse, bk)), 0.0)
  return p, p * (dot(do, v, NT) - _lanes(di, bk)), buckets


def _dq_kernel(*refs, st: Static, nq: int, nk: int):
  spans, rest = refs[:4], refs[12:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref = refs[4:12]
  table_ref, dq_ref, dbias_ref, dq_scr, dbias_scr = (
      rest if st.num_buckets else (None, rest[0], None, rest[1], None))
  b, h, qi, kj = (pl.program_id(i) for i in range(4))
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(kj == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if st.num_buckets:
      dbias_scr[...] = jnp.zeros(dbias_scr.shape, jnp.float32)

  def step(fast):
    mask = _mask(st, qseg_ref, kvseg_ref, qi, kj, bq, bk, fast)
    _, ds, buckets = _probs_and_ds(st, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                   lse_ref[...], di_ref[...], mask, table_ref, h, qi, kj, bq, bk,
                                   fast)
    dq_scr[...] += dot(ds.astype(k_ref.dtype), k_ref[...]) * st.scale
    if st.num_buckets:  # d table[n, h] = sum of ds where the bucket is n
      lane = jax.lax.broadcasted_iota(jnp.int32, dbias_scr.shape, 1)
      update = jnp.where(lane == buckets, jnp.sum(ds), 0.0) if fast else 0.0
      for n in range(0 if fast else st.num_buckets):
        update = update + jnp.where(lane == n, jnp.sum(jnp.where(buckets == n, ds, 0.0)), 0.0)
      dbias_scr[...] += update

  _steps(spans, b * nq + qi, kj, step)

  @pl.when(kj == nk - 1)
  def _store():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)
    if st.num_buckets:
      dbias_ref[...] = dbias_scr[...]


def _dkv_kernel(*refs, st: Static, nq: int, nk: int, R: int):
  spans, rest = refs[:4], refs[12:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref = refs[4:12]
  table_ref = rest[0] if st.num_buckets else None
  dk_ref, dv_ref, dk_scr, dv_scr = rest[1:] if st.num_buckets else rest
  b, g, kj, t = (pl.program_id(i) for i in range(4))
  h, qi = g * R + div(t, nq), jax.lax.rem(t, nq)  # the innermost axis: the group's heads x q blocks
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(fast):
    mask = _mask(st, qseg_ref, kvseg_ref, qi, kj, bq, bk, fast)
    q, do = q_ref[...], do_ref[...]
    p, ds, _ = _probs_and_ds(st, q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...],
                             mask, table_ref, h, qi, kj, bq, bk, fast)
    dv_scr[...] += dot(p.astype(do.dtype), do, TN)
    dk_scr[...] += dot(ds.astype(q.dtype), q, TN) * st.scale

  _steps(spans, b * nk + kj, qi, step)

  @pl.when(t == R * nq - 1)
  def _store():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(st: Static, q, k, v, q_seg, kv_seg, table, o, lse, do):
  """(dq, dk, dv, d table [H, buckets] or None) in the kernel layout."""
  (B, H, T, D), (G, S) = q.shape, k.shape[1:3]
  R = H // G
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, T]
  di = jnp.broadcast_to(di[..., None], (B, H, T, LANES))
  lse = jnp.broadcast_to(lse[..., None], (B, H, T, LANES))
  args = [q, k, v, do, lse, di, *_seg_layouts(q_seg, kv_seg)]  # then the table, if biased
  if st.num_buckets:
    args.append(table)
  nb_lanes = max(LANES, -(-st.num_buckets // LANES) * LANES)

  # dq (and the bias table's gradient): kv blocks innermost.
  bq, bk = st.block_q_dq, st.block_kv_dq
  nq, nk = T // bq, S // bk
  q_spec, kv_spec, row_spec, seg_specs = _q_specs(bq, bk, D, R, nq)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs]
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  scratch = [pltpu.VMEM((bq, D), jnp.float32)]
  if st.num_buckets:
    in_specs.append(SMEM)
    out_specs.append(pl.BlockSpec((None, None, SUBLANES, nb_lanes),
                                  lambda b, h, i, j, *_: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, nq * SUBLANES, nb_lanes), jnp.float32))
    scratch.append(pltpu.VMEM((SUBLANES, nb_lanes), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(B, H, nq, nk), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, interpret=st.interpret, name="flash_attention_dq",
      compiler_params=compiler_params(st, "dq", D, q.dtype),
  )(*common.spans(st, q_seg, kv_seg, bq, bk)[:4], *args)
  dq = outs[0]
  # d table [H, buckets]: the 8 sublane rows of a block are copies; take one, sum the rest
  dtable = outs[1][:, :, ::SUBLANES, :st.num_buckets].sum(axis=(0, 2)) if st.num_buckets else None

  # dk, dv: for each kv block, the innermost axis walks the R heads of its group x q blocks.
  bq, bk = st.block_q_dkv, st.block_kv_dkv
  nq, nk = T // bq, S // bk
  def q_index(b, g, j, t, *spans):
    return (b, g * R + div(t, nq), _fetched(spans, b * nk + j, jax.lax.rem(t, nq)), 0)

  q_spec = pl.BlockSpec((None, None, bq, D), q_index)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_index)
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, g, j, t, *_: (b, g, j, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
              pl.BlockSpec((None, bq, LANES), lambda b, g, j, t, *spans: (
                  b, q_index(b, g, j, t, *spans)[2], 0)),
              pl.BlockSpec((None, SUBLANES, bk), lambda b, g, j, t, *_: (b, 0, j))]
  if st.num_buckets:
    in_specs.append(SMEM)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk, R=R),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(B, G, nk, R * nq), in_specs=in_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler_params(st, "dk/dv", D, q.dtype),
      interpret=st.interpret, name="flash_attention_dkv",
  )(*common.spans(st, q_seg, kv_seg, bq, bk)[4:], *args)
  return dq, dk, dv, dtable
