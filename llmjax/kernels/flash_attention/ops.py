"""`flash_attention`: checks, layout and padding around the kernels, and their custom VJP."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from llmjax.kernels import buckets, targets
from llmjax.kernels.flash_attention import common, reference, tpu

HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key/value block lengths of the forward, dq and dk/dv kernels.

  Each a multiple of 8 from 8 to 2048; None: the target's default (tpu.py / gpu.py
  `default_blocks`), or for a backward block its forward one if given. TPU kv blocks are
  multiples of 128, GPU blocks powers of two; blocks over the target's memory are refused
  before compiling. A shorter sequence uses one smaller block, a longer one is padded."""
  block_q: int | None = None
  block_kv: int | None = None
  block_q_dq: int | None = None
  block_kv_dq: int | None = None
  block_q_dkv: int | None = None
  block_kv_dkv: int | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None:
        continue
      if not isinstance(value, int) or value < 8 or value % 8 or value > 2048:
        raise ValueError(f"BlockSizes.{field.name}={value!r}: a block must be a multiple of 8 "
                         f"between 8 and 2048")

  def resolved(self, default: tuple[int, ...]) -> tuple[int, ...]:
    """The six sizes, with the (six) defaults where None."""
    given = [getattr(self, field.name) for field in dataclasses.fields(self)]
    forward = [given[i] or default[i] for i in (0, 1)]
    return (*forward, *(size or (forward[i % 2] if given[i % 2] else default[i])
                        for i, size in enumerate(given) if i >= 2))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _fit(block: int, length: int, quantum: int, backend: str) -> int:
  """The block, or one just covering a shorter sequence (TPU: in `quantum`s; GPU: 2^k >= 16)."""
  if backend == "gpu":
    return min(block, max(16, 1 << (length - 1).bit_length()))
  return min(block, _round_up(length, quantum))


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, kv_segment_ids=None,
                    bias_table=None, bias_bidirectional: bool = True, bias_max_distance: int = 128,
                    window: int | None = None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                    backend: str | None = None, target: str | None = None):
  """Softmax attention of q [B, T, H, D] over k, v [B, S, G, D] (H % G == 0), never forming
  a T x S matrix: reference.attention_reference's result, [B, T, H, D] in q's dtype. Raises
  ValueError on bad inputs (reference.py's layout, HEAD_DIMS), options or blocks.

  Args:
    causal, segment_ids ([B, T], 0 = padding), kv_segment_ids ([B, S]; default segment_ids),
      window, scale (default 1 / sqrt(D)): the masks and scale of reference.py.
    bias_table: T5's relative position bias [num_buckets, H], bucketed by `bias_bidirectional`
      and `bias_max_distance`; it gets a gradient.
    block_sizes: `BlockSizes`; default the target's.
    interpret: run in the Pallas interpreter; default: unless on TPU or GPU.
    backend: "tpu" (Mosaic) or "gpu" (Triton); default the platform's ("tpu" on CPU).
    target: the accelerator compiled for, one of `targets.NAMES`, which sizes the default
      blocks and decides which fit. Default: the current mesh's devices' (compile-only
      devices included), else the local accelerator's; None on CPU (the smallest limits).
  """
  if backend not in (None, "tpu", "gpu"):
    raise ValueError(f"backend={backend!r}; expected 'tpu', 'gpu' or None")
  reference.validate_inputs(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                            bias_table=bias_table, bias_bidirectional=bias_bidirectional,
                            bias_max_distance=bias_max_distance, window=window)
  B, T, H, D = q.shape
  if D not in HEAD_DIMS:
    raise ValueError(f"head dim {D} is not supported by the kernel; expected one of {HEAD_DIMS}")
  S = k.shape[1]
  platform = jax.default_backend()
  if target is None:  # the mesh's devices (what a program is compiled for), else this host's
    device = jax.sharding.get_abstract_mesh().abstract_device
    target = targets.name_of(device) if device and device.platform in ("tpu", "gpu") else (
        targets.local())
  elif target not in targets.NAMES:
    raise ValueError(f"target={target!r}; expected one of {', '.join(targets.NAMES)}")
  backend = backend or ("gpu" if platform == "gpu" or target in targets.GPUS else "tpu")
  if target is not None and (target in targets.GPUS) != (backend == "gpu"):
    raise ValueError(f"target={target!r} is not a {backend.upper()}; backend={backend!r} "
                     f"kernels compile for {', '.join(getattr(targets, backend.upper() + 'S'))}")
  kernels = _kernels(backend)
  blocks = (block_sizes or BlockSizes()).resolved(
      kernels.default_blocks(target, D, q.dtype, bias_table is not None))
  if interpret is None:
    interpret = platform not in ("tpu", "gpu") and target is None
  if not interpret and platform in ("tpu", "gpu") and backend != platform:
    raise ValueError(f"backend={backend!r} kernels cannot run on this {platform}; use "
                     f"backend={platform!r} or interpret=True")
  bq = [_fit(b, T, 8, backend) for b in blocks[0::2]]
  # kv blocks past one lane width are whole lane widths (interpreted too: the TPU kernels'
  # lane-replicated statistics tile them).
  bk = [_fit(b, S, 8 if interpret and S <= 128 else 128, backend) for b in blocks[1::2]]
  if not interpret and backend == "tpu" and any(b % 128 for b in bk):
    raise ValueError(f"kv block sizes {bk} must be multiples of 128 on TPU")
  Tp, Sp = _round_up(T, math.lcm(*bq)), _round_up(S, math.lcm(*bk))
  st = common.Static(
      causal=causal, window=window, scale=float(D ** -0.5 if scale is None else scale),
      num_buckets=0 if bias_table is None else bias_table.shape[0],
      bias_bidirectional=bias_bidirectional,
      block_q=bq[0], block_kv=bk[0], block_q_dq=bq[1], block_kv_dq=bk[1], block_q_dkv=bq[2],
      block_kv_dkv=bk[2], interpret=bool(interpret), backend=backend, target=target,
      bucket_thresholds=() if bias_table is None else buckets.distance_thresholds(
          bidirectional=bias_bidirectional, num_buckets=bias_table.shape[0],
          max_distance=bias_max_distance))
  kernels.check(st, D, q.dtype)
  if segment_ids is None:
    q_seg, kv_seg = jnp.ones((B, T), jnp.int32), jnp.ones((B, S), jnp.int32)
  else:
    q_seg = segment_ids.astype(jnp.int32)
    kv_seg = (segment_ids if kv_segment_ids is None else kv_segment_ids).astype(jnp.int32)
  q_seg = jnp.pad(q_seg, ((0, 0), (0, Tp - T)))  # padding: segment 0
  kv_seg = jnp.pad(kv_seg, ((0, 0), (0, Sp - S)))
  table = None if bias_table is None else bias_table.astype(jnp.float32).T  # [H, buckets]
  q_p = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  k_p = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  v_p = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  out = _flash(st, q_p, k_p, v_p, q_seg, kv_seg, table)
  return out[:, :, :T].transpose(0, 2, 1, 3)


def _kernels(backend: str):
  if backend == "gpu":
    from llmjax.kernels.flash_attention import gpu
    return gpu
  return tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_seg, kv_seg, table):
  return _kernels(st.backend).forward(st, q, k, v, q_seg, kv_seg, table)[0]


def _flash_fwd(st, q, k, v, q_seg, kv_seg, table):
  o, lse = _kernels(st.backend).forward(st, q, k, v, q_seg, kv_seg, table)
  return o, (q, k, v, q_seg, kv_seg, table, o, lse)


def _flash_bwd(st, residuals, do):
  dq, dk, dv, dtable = _kernels(st.backend).backward(st, *residuals, do)
  return dq, dk, dv, None, None, dtable


_flash.defvjp(_flash_fwd, _flash_bwd)
