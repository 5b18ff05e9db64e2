"""Flash attention for GPU (Triton): forward, dq and dk/dv kernels, one program per block.

Triton keeps no scratch across grid steps, so each program owns one output block and loops
over the blocks it reduces over inside the kernel, with the running state in registers: the
forward and dq kernels run over (batch, head, query block) and loop over kv blocks; the dk/dv
kernel runs over (batch, kv group, kv block) and loops over the group's query heads and their
query blocks. The loops only span the blocks the causal diagonal and the window leave
visible, and within them a block of a packed segment disjoint from the program's (from
per-block segment ranges computed outside the kernel) is skipped by a `lax.cond`, not
computed and zeroed. The T5 relative bias is computed per block from the bucket table, so no
T x S bias exists, and its gradient is summed per bucket in the dq kernel.

Layouts are those of tpu.py (q [B, H, T, D], k and v [B, G, S, D], T and S padded to the
blocks with segment id 0); per-row statistics (lse) are [B, H, T] float32. Triton needs every
block to be a power of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels.flash_attention import common
from llmjax.kernels.flash_attention.common import NEG, NT, TN, Static, dot

PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)
BLOCKS = ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv")


def default_blocks(target: str | None, D: int, dtype, bias: bool) -> tuple[int, int]:
  """(block_q, block_kv) when BlockSizes leaves them to the target."""
  return 128, 128


def check(st: Static, D: int, dtype, R: int):
  """Refuses, in one line, blocks that Triton cannot tile or that do not fit the target."""
  for name in BLOCKS:
    size = getattr(st, name)
    if size & (size - 1):
      raise ValueError(f"{name}={size} is not a power of two, which the Triton (GPU) flash "
                       f"attention kernels need")
    if size < 16 and not st.interpret:
      raise ValueError(f"{name}={size}: Triton's matrix multiplies need blocks of 16 or more")


def _div(a, b: int):
  """a // b for non-negative traced ints, lowered without floor division's sign handling."""
  return jax.lax.div(a, b)


def _kv_blocks(st: Static, qi, bq: int, bk: int, nk: int):
  """[lo, hi): the kv blocks the causal diagonal and the window leave visible to q block qi."""
  first, last = qi * bq, qi * bq + bq - 1  # the block's first and last query
  lo, hi = 0, nk
  if st.causal:
    hi = jnp.minimum(_div(last, bk) + 1, nk)
  if st.window is not None:  # keys > query - window; non-causal also keys < query + window
    lo = _div(jnp.maximum(first - st.window + 1, 0), bk)
    if not st.causal:
      hi = jnp.minimum(_div(last + st.window - 1, bk) + 1, nk)
  return lo, hi


def _q_blocks(st: Static, kj, bq: int, bk: int, nq: int):
  """[lo, hi): the q blocks that may see kv block kj (the transpose of _kv_blocks)."""
  first, last = kj * bk, kj * bk + bk - 1  # the block's first and last key
  lo, hi = 0, nq
  if st.causal:
    lo = _div(first, bq)
  if st.window is not None:  # queries < key + window; non-causal also queries > key - window
    hi = jnp.minimum(_div(last + st.window - 1, bq) + 1, nq)
    if not st.causal:
      lo = _div(jnp.maximum(first - st.window + 1, 0), bq)
  return lo, hi


def _mask(st: Static, qseg, kvseg, qi, kj, bq: int, bk: int):
  """[bq, bk] float32: 1 where the query may see the key (same non-padding segment, causal,
  window), else 0. Built from integer arithmetic, never a boolean: Triton cannot stage
  booleans in shared memory, which it does when it changes a tensor's layout (the dk/dv
  kernel with the T5 bias did: 'ttg.local_alloc' op element type bit width ...)."""
  def at_least_one(x):  # 1 where x >= 1, 0 where x <= 0 (integers)
    return jnp.clip(x, 0, 1)
  keep = (1 - at_least_one(jnp.abs(qseg[:, None] - kvseg[None, :]))) * at_least_one(qseg)[:, None]
  if st.causal or st.window is not None:
    row = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    col = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if st.causal:
      keep = keep * at_least_one(row - col + 1)
    if st.window is not None:
      distance = row - col if st.causal else jnp.abs(row - col)
      keep = keep * at_least_one(st.window - distance)
  return keep.astype(jnp.float32)


def _masked(s, mask):
  """The logits with NEG where the mask is 0 (a select without a boolean)."""
  return s * mask + (1.0 - mask) * NEG


def _logits(st: Static, q, k, table_ref, h, qi, kj, bq: int, bk: int):
  s = dot(q, k, NT) * st.scale
  buckets = None
  if st.num_buckets:
    buckets = common.buckets(st, qi, kj, bq, bk)
    # A gathering load (one per logit, from L1) where common.bias selects once per bucket.
    s = s + table_ref[h, buckets]
  return s, buckets


def _overlap(lo_a, hi_a, lo_b, hi_b):
  """Whether two blocks' segment ranges meet (an all-padding block's range is empty)."""
  return (lo_a <= hi_b) & (lo_b <= hi_a)


def _skip_unless(visible, step, carry):
  """step(carry) if visible, else carry unchanged (an scf.if in Triton: the block is not read)."""
  return jax.lax.cond(visible, step, lambda carry: carry, carry)


def _block(index, size: int):
  """The rows of block `index` of `size` rows (aligned, which Triton can vectorize on)."""
  return pl.ds(pl.multiple_of(index * size, size), size)


def _full():
  """The whole array: the segment ranges and the bias table, indexed inside the kernels."""
  return pl.BlockSpec()


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(q_lo, q_hi, kv_lo, kv_hi, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, *rest,
                st: Static, nq: int, nk: int):
  table_ref = rest[0] if st.num_buckets else None
  o_ref, lse_ref = rest[-2:]
  b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (bq, D), bk = q_ref.shape, st.block_kv
  q, qseg = q_ref[...], qseg_ref[...]
  q_range = q_lo[b * nq + qi], q_hi[b * nq + qi]

  def step(kj, carry):
    acc, m_prev, l_prev = carry  # [bq, D], [bq], [bq]
    cols = _block(kj, bk)
    s, _ = _logits(st, q, k_ref[cols, :], table_ref, h, qi, kj, bq, bk)
    mask = _mask(st, qseg, kvseg_ref[cols], qi, kj, bq, bk)
    s = _masked(s, mask)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None]) * mask
    alpha = jnp.exp(m_prev - m_next)
    pv = dot(p.astype(v_ref.dtype), v_ref[cols, :])
    return acc * alpha[:, None] + pv, m_next, alpha * l_prev + jnp.sum(p, axis=1)

  def body(kj, carry):
    visible = _overlap(*q_range, kv_lo[b * nk + kj], kv_hi[b * nk + kj])
    return _skip_unless(visible, functools.partial(step, kj), carry)

  init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(*_kv_blocks(st, qi, bq, bk, nk), body, init)
  empty = l == 0.0  # a row that may attend nothing: output 0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def forward(st: Static, q, k, v, q_seg, kv_seg, table):
  """(o [B, H, T, D], lse [B, H, T] float32) for padded inputs in the kernel layout."""
  B, H, T, D = q.shape
  G, S = k.shape[1], k.shape[2]
  bq, bk = st.block_q, st.block_kv
  nq, nk, R = T // bq, S // bk, H // G
  in_specs = [_full()] * 4 + [
      pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
      pl.BlockSpec((None, None, S, D), lambda b, h, i: (b, _div(h, R), 0, 0)),
      pl.BlockSpec((None, None, S, D), lambda b, h, i: (b, _div(h, R), 0, 0)),
      pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      pl.BlockSpec((None, S), lambda b, h, i: (b, 0)),
  ]
  args = [*common.block_ranges(q_seg, kv_seg, bq, bk), q, k, v, q_seg, kv_seg]
  if st.num_buckets:
    in_specs.append(_full())
    args.append(table)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk), grid=(B, H, nq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=PARAMS, interpret=st.interpret, name="flash_attention_fwd_gpu",
  )(*args)


# ------------------------------------------------------------------------------ backward


def _probs_and_ds(st, q, k, v, do, lse, di, mask, table_ref, h, qi, kj, bq, bk):
  """p = softmax probabilities and ds = d loss / d logits of one block."""
  s, buckets = _logits(st, q, k, table_ref, h, qi, kj, bq, bk)
  p = jnp.exp(_masked(s, mask) - lse[:, None]) * mask  # masked first: no inf * 0
  dp = dot(do, v, NT)
  return p, p * (dp - di[:, None]), buckets


def _dq_kernel(q_lo, q_hi, kv_lo, kv_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               qseg_ref, kvseg_ref, *rest, st: Static, nq: int, nk: int, nb_pad: int):
  if st.num_buckets:
    table_ref, dq_ref, dbias_ref = rest
  else:
    (dq_ref,), table_ref = rest, None
  b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (bq, D), bk = q_ref.shape, st.block_kv_dq
  q, do, lse, di, qseg = q_ref[...], do_ref[...], lse_ref[...], di_ref[...], qseg_ref[...]
  q_range = q_lo[b * nq + qi], q_hi[b * nq + qi]
  lane = jax.lax.broadcasted_iota(jnp.int32, (nb_pad,), 0)

  def step(kj, carry):
    cols = _block(kj, bk)
    k = k_ref[cols, :]
    mask = _mask(st, qseg, kvseg_ref[cols], qi, kj, bq, bk)
    _, ds, buckets = _probs_and_ds(st, q, k, v_ref[cols, :], do, lse, di, mask, table_ref, h,
                                   qi, kj, bq, bk)
    dq = carry[0] + dot(ds.astype(k.dtype), k) * st.scale
    if not st.num_buckets:
      return (dq,)
    dbias = carry[1]  # d table[h, n] = sum of ds where the bucket is n
    for n in range(st.num_buckets):
      dbias = dbias + jnp.where(lane == n, jnp.sum(jnp.where(buckets == n, ds, 0.0)), 0.0)
    return dq, dbias

  def body(kj, carry):
    visible = _overlap(*q_range, kv_lo[b * nk + kj], kv_hi[b * nk + kj])
    return _skip_unless(visible, functools.partial(step, kj), carry)

  init = (jnp.zeros((bq, D), jnp.float32),)
  if st.num_buckets:
    init += (jnp.zeros((nb_pad,), jnp.float32),)
  out = jax.lax.fori_loop(*_kv_blocks(st, qi, bq, bk, nk), body, init)
  dq_ref[...] = out[0].astype(dq_ref.dtype)
  if st.num_buckets:
    dbias_ref[...] = out[1]


def _dkv_kernel(q_lo, q_hi, kv_lo, kv_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                qseg_ref, kvseg_ref, *rest, st: Static, nq: int, nk: int):
  table_ref = rest[0] if st.num_buckets else None
  dk_ref, dv_ref = rest[-2:]
  b, g, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (bk, D), bq, R = k_ref.shape, st.block_q_dkv, q_ref.shape[0]
  k, v, kvseg = k_ref[...], v_ref[...], kvseg_ref[...]
  kv_range = kv_lo[b * nk + kj], kv_hi[b * nk + kj]

  def step(r, qi, carry):
    dk, dv = carry
    rows = _block(qi, bq)
    q, do = q_ref[r, rows, :], do_ref[r, rows, :]
    mask = _mask(st, qseg_ref[rows], kvseg, qi, kj, bq, bk)
    p, ds, _ = _probs_and_ds(st, q, k, v, do, lse_ref[r, rows], di_ref[r, rows], mask,
                             table_ref, g * R + r, qi, kj, bq, bk)
    dv = dv + dot(p.astype(do.dtype), do, TN)
    dk = dk + dot(ds.astype(q.dtype), q, TN) * st.scale
    return dk, dv

  q_blocks = _q_blocks(st, kj, bq, bk, nq)

  def head(r, carry):  # the group's query heads share this kv block
    def body(qi, carry):
      visible = _overlap(q_lo[b * nq + qi], q_hi[b * nq + qi], *kv_range)
      return _skip_unless(visible, functools.partial(step, r, qi), carry)
    return jax.lax.fori_loop(*q_blocks, body, carry)

  init = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
  dk, dv = jax.lax.fori_loop(0, R, head, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st: Static, q, k, v, q_seg, kv_seg, table, o, lse, do):
  """(dq, dk, dv, d table [H, buckets] or None) in the kernel layout."""
  B, H, T, D = q.shape
  G, S = k.shape[1], k.shape[2]
  R = H // G
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, T]
  nb_pad = pl.next_power_of_2(max(st.num_buckets, 1))

  # dq (and the bias table's gradient): a program per q block, looping over kv blocks.
  bq, bk = st.block_q_dq, st.block_kv_dq
  nq, nk = T // bq, S // bk
  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, S, D), lambda b, h, i: (b, _div(h, R), 0, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  in_specs = [_full()] * 4 + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                              pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                              pl.BlockSpec((None, S), lambda b, h, i: (b, 0))]
  args = [*common.block_ranges(q_seg, kv_seg, bq, bk), q, k, v, do, lse, di, q_seg, kv_seg]
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if st.num_buckets:
    in_specs.append(_full())
    args.append(table)
    out_specs.append(pl.BlockSpec((None, None, None, nb_pad), lambda b, h, i: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, nq, nb_pad), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nq=nq, nk=nk, nb_pad=nb_pad), grid=(B, H, nq),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, compiler_params=PARAMS,
      interpret=st.interpret, name="flash_attention_dq_gpu",
  )(*args)
  dq = outs[0]
  dtable = outs[1][..., :st.num_buckets].sum(axis=(0, 2)) if st.num_buckets else None

  # dk, dv: a program per kv block, looping over its group's R heads and their q blocks.
  bq, bk = st.block_q_dkv, st.block_kv_dkv
  nq, nk = T // bq, S // bk
  heads_spec = pl.BlockSpec((None, R, T, D), lambda b, g, j: (b, g, 0, 0))
  heads_row_spec = pl.BlockSpec((None, R, T), lambda b, g, j: (b, g, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, g, j: (b, g, j, 0))
  in_specs = [_full()] * 4 + [heads_spec, kv_spec, kv_spec, heads_spec, heads_row_spec,
                              heads_row_spec, pl.BlockSpec((None, T), lambda b, g, j: (b, 0)),
                              pl.BlockSpec((None, bk), lambda b, g, j: (b, j))]
  args = [*common.block_ranges(q_seg, kv_seg, bq, bk), q, k, v, do, lse, di, q_seg, kv_seg]
  if st.num_buckets:
    in_specs.append(_full())
    args.append(table)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk), grid=(B, G, nk),
      in_specs=in_specs, out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=PARAMS, interpret=st.interpret, name="flash_attention_dkv_gpu",
  )(*args)
  return dq, dk, dv, dtable
