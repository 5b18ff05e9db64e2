"""Flash attention for GPU (Triton): forward, dq and dk/dv kernels, one program per block.

Triton keeps no scratch across grid steps, so a program owns one output block and loops over
the visible blocks it reduces over (common.spans), its state in registers: forward and dq over
(query block, batch, head), looping over kv blocks; dk/dv over (kv block, batch, kv group),
looping over the group's query heads and their blocks (neighbours share rows in L2). The T5
bias is gathered per logit from the bias of each distance. Layouts are tpu.py's, with lse
[B, H, T] float32; every block is a power of two (Triton)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import targets
from llmjax.kernels.flash_attention import common
from llmjax.kernels.flash_attention.common import NEG, NN, NT, TN, Static, div, dot

KERNELS = {  # kernel: the BlockSizes fields of its (program's block, looped-over block)
    "fwd": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"),
    "dkv": ("block_kv_dkv", "block_q_dkv")}
TILE = 128 * 256  # the largest [program block, loop block] float32 tile: half the registers
FULL = pl.BlockSpec()  # the whole array: the spans and the T5 bias, indexed inside the kernels


def default_blocks(target: str | None, D: int, dtype, bias: bool) -> tuple[int, ...]:
  """The six BlockSizes: Triton's FlashAttention-2 tiles (forward 128 x 64, dq 128 x 32, dk/dv
  64 x 32), which ptxas compiles without spills on A100 and H100 up to D 128 in bfloat16;
  halved, then halved again, for wider rows."""
  row = D * jnp.dtype(dtype).itemsize
  if row <= 256:
    return 128, 64, 128, 32, 32, 64
  return (64, 32, 64, 32, 32, 64) if row <= 512 else (32, 16, 32, 16, 16, 32)


def _smem(st: Static, kernel: str, D: int, itemsize: int, stages: int) -> int:
  """Bytes of shared memory Triton gives `kernel` (an upper bound): its program's own rows,
  `stages` buffers of the rows and statistics its loop pipelines, float32 tiles staged for the
  T5 bias (one) and float32 products' operands (two). Hopper's wgmma reads operands from shared
  memory (TF32 only K-major: transposed copies): x1.2, x1.4 with float32 or T5 bias (measured
  up to 1.16, 1.36)."""
  own, loop = (getattr(st, name) for name in KERNELS[kernel])
  rows = {"fwd": (1, 2, 4), "dq": (2, 2, 4), "dkv": (2, 2, 12)}[kernel]
  tiles = bool(st.num_buckets) + 2 * (itemsize == 4 and _ieee())
  ampere = (own * rows[0] * D * itemsize + stages * loop * (rows[1] * D * itemsize + rows[2])
            + tiles * own * loop * 4)
  if targets.GPUS[st.target or "a100"]["capability"][0] < 9:
    return ampere
  return int(ampere * (1.4 if itemsize == 4 or st.num_buckets else 1.2))


def _params(st: Static, kernel: str, D: int, itemsize: int) -> plgpu.CompilerParams:
  """8 warps from tiles of 128 x 32 x 128 (rows x columns x D; dk/dv, two accumulators, from
  64 x 32 x 128), else 4; the most pipeline stages (3, 2, 1) that fit shared memory."""
  own, loop = (getattr(st, name) for name in KERNELS[kernel])
  limit = targets.GPUS[st.target or "a100"]["smem_per_block"]
  return plgpu.CompilerParams(
      num_warps=8 if own * loop * D >= (64 if kernel == "dkv" else 128) * 32 * 128 else 4,
      num_stages=next((n for n in (3, 2) if _smem(st, kernel, D, itemsize, n) <= limit), 1))


def check(st: Static, D: int, dtype):
  """Refuses, in one line, blocks Triton cannot tile or the target's registers (a logits tile
  beyond half of them) or shared memory (unpipelined) cannot hold."""
  target = st.target or "a100"
  for kernel, names in KERNELS.items():
    for name in names:
      size = getattr(st, name)
      if size & (size - 1):
        raise ValueError(f"{name}={size} is not a power of two, which the Triton (GPU) flash "
                         f"attention kernels need")
      if size < 16 and not st.interpret:
        raise ValueError(f"{name}={size}: Triton's matrix multiplies need blocks of 16 or more")
    own, loop = (getattr(st, name) for name in names)
    if st.interpret:
      continue
    smem = _smem(st, kernel, D, jnp.dtype(dtype).itemsize, 1)
    blocks = f"{names[0]}={own} x {names[1]}={loop}"
    if own * loop > TILE:
      raise ValueError(f"BlockSizes {blocks}: a {own * loop}-logit tile is more than the "
                       f"{TILE} a GPU's registers hold; use smaller blocks")
    if smem > targets.GPUS[target]["smem_per_block"]:
      raise ValueError(
          f"BlockSizes {blocks} at head dim {D} {jnp.dtype(dtype).name}: the {kernel} kernel "
          f"needs {smem} bytes of shared memory, more than {target}'s "
          f"{targets.GPUS[target]['smem_per_block']}; use smaller blocks")


def _ieee() -> bool:
  """Whether float32 blocks multiply in IEEE float32 (no tensor cores, slow, larger shared
  tiles): under jax_default_matmul_precision "highest" or "float32"; else TF32, as XLA's."""
  return jax.config.jax_default_matmul_precision in ("highest", "float32")


def _dot(a, b, dims=NN):
  return dot(a, b, dims, exact=_ieee())


def _mask(st: Static, qseg, kvseg, qi, kj, bq: int, bk: int, fast: bool):
  """[bq, bk] float32: 1 where the query may see the key (segment, causal, window), else 0;
  None in a fast block. Integer arithmetic, never a boolean: Triton cannot stage booleans in
  shared memory to change a layout (dk/dv with T5 bias: 'ttg.local_alloc' op element type...)."""
  if fast:
    return None
  at_least = common.at_least
  keep = (1 - at_least(jnp.abs(qseg[:, None] - kvseg[None, :]))) * at_least(qseg)[:, None]
  if st.causal or st.window is not None:
    row = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    col = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if st.causal:
      keep = keep * at_least(row - col + 1)
    if st.window is not None:
      distance = row - col if st.causal else jnp.abs(row - col)
      keep = keep * at_least(st.window - distance)
  return keep.astype(jnp.float32)


def _masked(s, mask, other=NEG):
  """s with `other` where the mask is 0 (a select without a boolean); s if no mask."""
  if mask is None:
    return s
  return s * mask + (1.0 - mask) * other if other else s * mask


def _relative(st: Static, table, T: int, S: int):
  """[H, T + S - 1]: the T5 bias of each key - query, -(T - 1) to S - 1 (gathered, no buckets)."""
  return table[:, common.bucket_of(st, jnp.arange(1 - T, S, dtype=jnp.int32))]


def _logits(st: Static, q, k, bias_ref, h, qi, kj, bq: int, bk: int, T: int, fast: bool):
  """The block's scaled logits plus the T5 bias gathered by distance (+ T - 1; one if fast)."""
  s = _dot(q, k, NT) * st.scale
  if st.num_buckets and fast:
    s = s + bias_ref[h, T - 1 + kj * bk - qi * bq]
  elif st.num_buckets:
    s = s + bias_ref[h, T - 1 + kj * bk - qi * bq
                     + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
                     - jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)]
  return s


def _loop(spans, row, body, carry):
  """body(j, carry, fast) over a row's span: its fast run, then the rest on either side; both
  loops branch-free, so Triton pipelines their loads (cp.async)."""
  first, end, fast_first, fast_end = (x[row] for x in spans)
  carry = jax.lax.fori_loop(fast_first, fast_end, functools.partial(body, fast=True), carry)
  before = fast_first - first

  def other(n, carry):  # past `before` blocks, jump the run (arithmetic: no select)
    return body(first + n + jnp.clip(n - before + 1, 0, 1) * (fast_end - fast_first), carry,
                fast=False)
  return jax.lax.fori_loop(0, before + end - fast_end, other, carry)


def _block(index, size: int):
  """The rows of block `index` of `size` rows (aligned, which Triton can vectorize on)."""
  return pl.ds(pl.multiple_of(index * size, size), size)


def _fwd_kernel(*refs, st: Static, nq: int):
  spans, (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref), rest = refs[:4], refs[4:9], refs[9:]
  table_ref = rest[0] if st.num_buckets else None
  o_ref, lse_ref = rest[-2:]
  qi, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (bq, D), bk = q_ref.shape, st.block_kv
  q, qseg = q_ref[...], qseg_ref[...]

  def step(kj, carry, fast):
    acc, m_prev, l_prev = carry  # [bq, D], [bq], [bq]
    cols = _block(kj, bk)
    s = _logits(st, q, k_ref[cols, :], table_ref, h, qi, kj, bq, bk, nq * bq, fast)
    mask = _mask(st, qseg, kvseg_ref[cols], qi, kj, bq, bk, fast)
    s = _masked(s, mask)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = _masked(jnp.exp(s - m_next[:, None]), mask, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    pv = _dot(p.astype(v_ref.dtype), v_ref[cols, :])
    return acc * alpha[:, None] + pv, m_next, alpha * l_prev + jnp.sum(p, axis=1)

  init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _loop(spans, b * nq + qi, step, init)
  empty = l == 0.0  # a row that may attend nothing: output 0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def forward(st: Static, q, k, v, q_seg, kv_seg, table):
  """(o [B, H, T, D], lse [B, H, T] float32) for padded inputs in the kernel layout."""
  (B, H, T, D), (G, S) = q.shape, k.shape[1:3]
  bq, bk = st.block_q, st.block_kv
  nq, R = T // bq, H // G
  q_spec = pl.BlockSpec((None, None, bq, D), lambda i, b, h: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, S, D), lambda i, b, h: (b, div(h, R), 0, 0))
  in_specs = [FULL] * 4 + [q_spec, kv_spec, kv_spec,
                           pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                           pl.BlockSpec((None, S), lambda i, b, h: (b, 0))]
  args = [*common.spans(st, q_seg, kv_seg, bq, bk)[:4], q, k, v, q_seg, kv_seg]
  if st.num_buckets:
    in_specs.append(FULL)
    args.append(_relative(st, table, T, S))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, nq=nq), grid=(nq, B, H), in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=_params(st, "fwd", D, q.dtype.itemsize), interpret=st.interpret,
      name="flash_attention_fwd_gpu",
  )(*args)


def _probs_and_ds(st, q, k, v, do, lse, di, mask, table_ref, h, qi, kj, bq, bk, T, fast):
  """p = softmax probabilities and ds = d loss / d logits of one block."""
  s = _logits(st, q, k, table_ref, h, qi, kj, bq, bk, T, fast)
  p = _masked(jnp.exp(_masked(s, mask) - lse[:, None]), mask, 0.0)  # masked first: no inf * 0
  return p, p * (_dot(do, v, NT) - di[:, None])


def _dq_kernel(*refs, st: Static, nq: int, nb_pad: int):
  spans, rest = refs[:4], refs[12:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref = refs[4:12]
  table_ref, dq_ref, dbias_ref = rest if st.num_buckets else (None, rest[0], None)
  qi, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (bq, D), bk = q_ref.shape, st.block_kv_dq
  q, do, lse, di, qseg = q_ref[...], do_ref[...], lse_ref[...], di_ref[...], qseg_ref[...]
  lane = jax.lax.broadcasted_iota(jnp.int32, (nb_pad,), 0)

  def step(kj, carry, fast):
    cols = _block(kj, bk)
    k = k_ref[cols, :]
    mask = _mask(st, qseg, kvseg_ref[cols], qi, kj, bq, bk, fast)
    _, ds = _probs_and_ds(st, q, k, v_ref[cols, :], do, lse, di, mask, table_ref, h, qi, kj,
                          bq, bk, nq * bq, fast)
    dq = carry[0] + _dot(ds.astype(k.dtype), k) * st.scale
    if not st.num_buckets:
      return (dq,)
    if fast:  # one bucket
      bucket = common.bucket_of(st, kj * bk - qi * bq)
      return dq, carry[1] + jnp.where(lane == bucket, jnp.sum(ds), 0.0)
    # d table[h, n]: ds summed over bucket n, by selects (a gather compiles many times slower)
    dbias, buckets = carry[1], common.buckets(st, qi, kj, bq, bk)
    for n in range(st.num_buckets):
      dbias = dbias + jnp.where(lane == n, jnp.sum(jnp.where(buckets == n, ds, 0.0)), 0.0)
    return dq, dbias

  init = (jnp.zeros((bq, D), jnp.float32),)
  if st.num_buckets:
    init += (jnp.zeros((nb_pad,), jnp.float32),)
  out = _loop(spans, b * nq + qi, step, init)
  dq_ref[...] = out[0].astype(dq_ref.dtype)
  if st.num_buckets:
    dbias_ref[...] = out[1]


def _dkv_kernel(*refs, st: Static, nq: int, nk: int):
  spans, rest = refs[:4], refs[12:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref = refs[4:12]
  table_ref = rest[0] if st.num_buckets else None
  dk_ref, dv_ref = rest[-2:]
  kj, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  (bk, D), bq, R = k_ref.shape, st.block_q_dkv, q_ref.shape[0]
  k, v, kvseg = k_ref[...], v_ref[...], kvseg_ref[...]

  def step(r, qi, carry, fast):
    dk, dv = carry
    rows = _block(qi, bq)
    q, do = q_ref[r, rows, :], do_ref[r, rows, :]
    mask = _mask(st, qseg_ref[rows], kvseg, qi, kj, bq, bk, fast)
    p, ds = _probs_and_ds(st, q, k, v, do, lse_ref[r, rows], di_ref[r, rows], mask,
                         table_ref, g * R + r, qi, kj, bq, bk, nq * bq, fast)
    dv = dv + _dot(p.astype(do.dtype), do, TN)
    dk = dk + _dot(ds.astype(q.dtype), q, TN) * st.scale
    return dk, dv

  def head(r, carry):  # the group's query heads share this kv block
    return _loop(spans, b * nk + kj, functools.partial(step, r), carry)

  init = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
  dk, dv = jax.lax.fori_loop(0, R, head, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st: Static, q, k, v, q_seg, kv_seg, table, o, lse, do):
  """(dq, dk, dv, d table [H, buckets] or None) in the kernel layout."""
  (B, H, T, D), (G, S) = q.shape, k.shape[1:3]
  R = H // G
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, T]
  nb_pad = pl.next_power_of_2(max(st.num_buckets, 1))

  # dq (and the bias table's gradient): a program per q block, looping over kv blocks.
  bq, bk = st.block_q_dq, st.block_kv_dq
  nq = T // bq
  q_spec = pl.BlockSpec((None, None, bq, D), lambda i, b, h: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, S, D), lambda i, b, h: (b, div(h, R), 0, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  in_specs = [FULL] * 4 + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                           pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                           pl.BlockSpec((None, S), lambda i, b, h: (b, 0))]
  args = [*common.spans(st, q_seg, kv_seg, bq, bk)[:4], q, k, v, do, lse, di, q_seg, kv_seg]
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if st.num_buckets:
    in_specs.append(FULL)
    args.append(_relative(st, table, T, S))
    out_specs.append(pl.BlockSpec((None, None, None, nb_pad), lambda i, b, h: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, H, nq, nb_pad), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, nq=nq, nb_pad=nb_pad), grid=(nq, B, H),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=st.interpret,
      compiler_params=_params(st, "dq", D, q.dtype.itemsize), name="flash_attention_dq_gpu",
  )(*args)
  dq, dtable = outs[0], outs[1][..., :st.num_buckets].sum((0, 2)) if st.num_buckets else None

  # dk, dv: a program per kv block, looping over its group's R heads and their q blocks.
  bq, bk = st.block_q_dkv, st.block_kv_dkv
  nq, nk = T // bq, S // bk
  heads_spec = pl.BlockSpec((None, R, T, D), lambda j, b, g: (b, g, 0, 0))
  heads_row_spec = pl.BlockSpec((None, R, T), lambda j, b, g: (b, g, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D), lambda j, b, g: (b, g, j, 0))
  in_specs = [FULL] * 4 + [heads_spec, kv_spec, kv_spec, heads_spec, heads_row_spec,
                           heads_row_spec, pl.BlockSpec((None, T), lambda j, b, g: (b, 0)),
                           pl.BlockSpec((None, bk), lambda j, b, g: (b, j))]
  args = [*common.spans(st, q_seg, kv_seg, bq, bk)[4:], q, k, v, do, lse, di, q_seg, kv_seg]
  if st.num_buckets:
    in_specs.append(FULL)
    args.append(_relative(st, table, T, S))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk), grid=(nk, B, G),
      in_specs=in_specs, out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(st, "dkv", D, q.dtype.itemsize), interpret=st.interpret,
      name="flash_attention_dkv_gpu",
  )(*args)
  return dq, dk, dv, dtable
