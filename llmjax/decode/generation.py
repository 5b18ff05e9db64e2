"""One compiled generation loop for decoder-only (GPT) and encoder-decoder (T5) models.

Prompts are checked on the host and padded to a length bucket (GPT: on the left, so every last
prompt token shares a slot; T5: on the right); one jitted function prefills the KV cache in one
pass, then runs a `lax.while_loop` of one token per step until every row has finished. Rows keep
their own positions and padding (segment id 0) is masked out, so each row is as if alone."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import sharding as sh
from llmjax.decode import beam
from llmjax.decode.sampling import Sampler
from llmjax.models.gpt import GPT
from llmjax.models.t5 import T5

_MIN_BUCKET = 16
TRACES = {"generate": 0}  # how often the loop was traced (compiled), for tests and benchmarks


def bucket(n: int, cap: int | None = None) -> int:
  """The length a request of n is padded to: a power of two from 16 (at most `cap`, if n fits)."""
  b = max(_MIN_BUCKET, 1 << max(0, n - 1).bit_length())
  return max(n, min(b, cap)) if cap else b


def _as_rows(prompts, vocab_size: int) -> list[np.ndarray]:
  """The prompts as a list of int arrays, checked: 2-D when an array, non-empty, ids in vocab."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    if prompts.ndim != 2:
      raise ValueError(f"generate: prompts must be an int [batch, length] array or a list of "
                       f"token lists, got an array of shape {prompts.shape}")
    prompts = np.asarray(prompts)
  rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
  if not rows:
    raise ValueError("generate: no prompts given")
  for b, row in enumerate(rows):
    if not row.size:
      raise ValueError(f"generate: prompt {b} is empty; every prompt needs at least one token")
    bad = row[(row < 0) | (row >= vocab_size)]
    if bad.size:
      raise ValueError(f"generate: prompt {b} holds token id {int(bad[0])}, outside the "
                       f"model's vocabulary [0, {vocab_size})")
  return rows


def _check_request(model, lengths, max_new_tokens, num_beams, sampler, eos_id, pad_id):
  cfg = model.cfg
  for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
    if int(value) != value or value < 1:
      raise ValueError(f"generate: {name}={value}; expected a whole number >= 1")
  if num_beams > 1 and not sampler.greedy:
    raise ValueError(f"generate: num_beams={num_beams} with temperature={sampler.temperature}: "
                     f"beam search is deterministic; use temperature=0 with beams")
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is not None and not 0 <= value < cfg.vocab_size:
      raise ValueError(f"generate: {name}={value} is outside the vocabulary [0, {cfg.vocab_size})")
  if isinstance(model, GPT) and cfg.positions == "learned":
    longest = max(lengths)
    if longest + max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"generate: a prompt of {longest} tokens plus max_new_tokens="
                       f"{max_new_tokens} is {longest + max_new_tokens} positions, beyond the "
                       f"model's {cfg.max_seq_len} learned positions (GPTConfig.max_seq_len)")


def generate(model: nn.Module, params, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             rng: jax.Array | None = None, stream: Callable | None = None) -> jax.Array:
  """New tokens for each prompt, int32 [B, max_new_tokens]; pad_id after a row's EOS.

  `model`, `params`: a GPT or T5 and its parameters (sharded params run sharded). `prompts`: an
  int [B, T] array or B token lists of any lengths (T5: the encoder inputs; the decoder starts
  from `pad_id`). temperature 0 is greedy, else sampling filtered by top_k / top_p with `rng`
  (default key 0). num_beams > 1: transformers' beam search (scores divided by generated
  length ** length_penalty), returning the best beam. eos_id None never stops early.
  `stream(tokens_B)` is called from the compiled loop with each step's tokens (numpy [B])."""
  if not isinstance(model, (GPT, T5)):
    raise ValueError(f"generate: {type(model).__name__} is not a generative model; expected a "
                     f"GPT or T5 (use fill_mask or embed for BERT)")
  sampler = Sampler(temperature, top_k, top_p)
  rows = _as_rows(prompts, model.cfg.vocab_size)
  _check_request(model, [len(r) for r in rows], max_new_tokens, num_beams, sampler, eos_id,
                 pad_id)
  if stream is not None and num_beams > 1:
    raise ValueError("generate: stream= needs num_beams=1 (the best beam is known only at the end)")
  is_gpt = isinstance(model, GPT)
  cap = model.cfg.max_seq_len if is_gpt and model.cfg.positions == "learned" else None
  P_ = bucket(max(len(r) for r in rows), cap)
  tokens_BP = np.full((len(rows), P_), pad_id, np.int32)
  segment_ids_BP = np.zeros((len(rows), P_), np.int32)
  for b, row in enumerate(rows):
    at = slice(P_ - len(row), P_) if is_gpt else slice(0, len(row))
    tokens_BP[b, at], segment_ids_BP[b, at] = row, 1
  rng = jax.random.key(0) if rng is None else rng
  N = bucket(int(max_new_tokens))
  divisors_N = beam.length_divisors(N, length_penalty)
  special = np.array([-1 if eos_id is None else eos_id, pad_id], np.int32)  # -1: no EOS
  fn = _generate(model.clone(decode=True, parent=None), N, int(num_beams), sampler, stream)
  out_BN = run_on_mesh_of(fn, params, (tokens_BP, segment_ids_BP), np.int32(max_new_tokens),
                          rng, divisors_N, special)
  return out_BN[:, :max_new_tokens]


def run_on_mesh_of(fn, params, batch: tuple, *rest):
  """fn(params, *batch, *rest) on the parameters' mesh (if any), numpy `batch` split by batch."""
  mesh = sh.mesh_of(params)
  if mesh is None:
    return fn(params, *batch, *rest)
  spec = P(*nn.logical_to_mesh_axes((sh.BATCH,), sh.RULES))
  batch = tuple(jax.device_put(a, NamedSharding(mesh, sh.fit_spec(spec, a.shape[:1], mesh)))
                for a in batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.RULES):
    return fn(params, *batch, *rest)


def _zero_cache(model, init):
  """The model's cache collection, all zeros, without running the initializers."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init)["cache"])


_SELF_CACHE = {"cached_key": 2, "cached_value": 2, "cached_segment_ids": 1}  # name: S axis


def _self_cache(model, cache, fn):
  """`cache` with fn(leaf, batch axis, length axis) applied to the self-attention leaves (the
  cross-attention cache is the same for every beam of a row and never grows)."""
  scanned = 1 if model.cfg.scan_layers else 0

  def one(path, x):
    axis = _SELF_CACHE.get(getattr(path[-1], "key", None))
    return x if axis is None else fn(x, scanned, axis + scanned)
  return jax.tree_util.tree_map_with_path(one, cache)


def _apply(model, params, cache, *args, **kw):
  logits, mutated = model.apply({"params": params, "cache": cache}, *args, mutable=["cache"],
                                **kw)
  return logits[:, -1], mutated["cache"]


def _prefill_gpt(model, params, tokens_BP, segment_ids_BP, cache_len: int, copies: int):
  """Prefills the cache with the left-padded prompts: (next logits [B * copies, V], cache, step)."""
  B = tokens_BP.shape[0]
  positions_BP = jnp.maximum(jnp.cumsum(segment_ids_BP, axis=1) - 1, 0)
  cache = _zero_cache(model, lambda: model.init(
      jax.random.key(0), jnp.zeros((B, cache_len), jnp.int32),
      positions=jnp.zeros((B, cache_len), jnp.int32)))
  logits_BV, cache = _apply(model, params, cache, tokens_BP, segment_ids_BP, positions_BP,
                            last_only=True)
  lengths_B = segment_ids_BP.sum(axis=1)
  if copies > 1:
    logits_BV, lengths_B = (jnp.repeat(x, copies, axis=0) for x in (logits_BV, lengths_B))
    cache = _self_cache(model, cache, lambda x, batch, _: jnp.repeat(x, copies, axis=batch))

  def step(cache, token_B, i):
    """Feeds each row's token at new position i - 1; returns the logits for position i."""
    positions_B1 = (lengths_B + i - 1)[:, None]
    return _apply(model, params, cache, token_B[:, None], jnp.ones_like(positions_B1),
                  positions_B1)

  return logits_BV, cache, step


def _prefill_t5(model, params, tokens_BS, segment_ids_BS, cache_len: int, copies: int,
                start_id: int):
  """Encodes, then runs the decoder's start token (caching cross-attention's keys, values)."""
  encoded_BSD = model.apply({"params": params}, tokens_BS, segment_ids_BS, method="encode")
  encoded_BSD, segment_ids_BS = (jnp.repeat(x, copies, axis=0)
                                 for x in (encoded_BSD, segment_ids_BS))
  B = encoded_BSD.shape[0]
  cache = _zero_cache(model, lambda: model.init(
      jax.random.key(0), jnp.zeros(segment_ids_BS.shape, jnp.int32),
      jnp.zeros((B, cache_len), jnp.int32), segment_ids_BS))
  logits_BV, cache = _apply(model, params, cache, encoded_BSD,
                            jnp.full((B, 1), start_id, jnp.int32), segment_ids_BS,
                            method="decoder_logits")

  def step(cache, token_B, i):
    del i  # the decoder's cache index knows the position
    return _apply(model, params, cache, None, token_B[:, None], method="decoder_logits")

  return logits_BV, cache, step


def _stage_ends(N: int) -> list[int]:
  """Where a long loop (N >= 128) widens the cache it attends over: 64, 128, ... N, so early
  steps attend only over what is filled and the time per token stays flat."""
  ends = [64 << k for k in range(max(0, N.bit_length() - 7))] if N >= 128 else []
  return [e for e in ends if e < N] + [N]


def _staged_while(model, cond, body, state, N: int):
  """lax.while_loop(cond, body, state) in `_stage_ends`' stages, each seeing the self-attention
  cache (state[-1]) cut to what it can have filled; state[0] = i writes position len - N + i."""
  cache = state[-1]
  full = next(x.shape[-1] for path, x in jax.tree_util.tree_leaves_with_path(cache)
              if getattr(path[-1], "key", None) == "cached_segment_ids")  # [(L,) B, S]
  for end in _stage_ends(N):
    length = full - N + end  # room for new tokens 0 .. end - 1 (token 0 came with the prefill)
    part = _self_cache(model, cache, lambda x, _, axis: jax.lax.slice_in_dim(x, 0, length,
                                                                            axis=axis))
    state = jax.lax.while_loop(lambda s: cond(s) & (s[0] < end), body, (*state[:-1], part))
    cache = jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice(x, y, (0,) * x.ndim),
                         cache, state[-1])
  return (*state[:-1], cache)


def _sample_loop(model, step, logits_BV, cache, n_new, N: int, sampler: Sampler, eos_id, pad_id,
                 rng, stream):
  """Greedy or sampled tokens [B, N] (pad beyond n_new or after EOS), one per loop step."""
  B = logits_BV.shape[0]

  def choose(logits_BV, i, done_B):
    token_B = jnp.where(done_B, pad_id, sampler.choose(logits_BV, jax.random.fold_in(rng, i)))
    if stream is not None:
      io_callback(stream, None, token_B, ordered=True)
    return token_B, done_B | (token_B == eos_id)

  token_B, done_B = choose(logits_BV, 0, jnp.zeros((B,), bool))
  out_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(token_B)

  def cond(state):
    i, _, done_B, _, _ = state
    return (i < n_new) & ~jnp.all(done_B)

  def body(state):
    i, out_BN, done_B, token_B, cache = state
    logits_BV, cache = step(cache, token_B, i)
    token_B, done_B = choose(logits_BV, i, done_B)
    out_BN = jax.lax.dynamic_update_slice(out_BN, token_B[:, None], (0, i))
    return i + 1, out_BN, done_B, token_B, cache

  return _staged_while(model, cond, body, (jnp.int32(1), out_BN, done_B, token_B, cache), N)[1]


def _beam_loop(model, step, logits_XV, cache, n_new, N: int, W: int, eos_id, pad_id, divisors_N):
  """Beam search over B * W rows (W beams per prompt); the best finished beam per prompt."""
  B = logits_XV.shape[0] // W

  def advance(beams, logits_XV, cache, i):
    beams, token_BW, parent_X = beam.step(beams, logits_XV.reshape(B, W, -1), i,
                                          i == n_new - 1, eos_id, divisors_N)
    # Each new beam takes over the cache of the beam it extends.
    cache = _self_cache(model, cache, lambda x, batch, _: jnp.take(x, parent_X, axis=batch))
    return beams, token_BW.reshape(B * W), cache

  state = (jnp.int32(1), *advance(beam.init(B, W, N, pad_id), logits_XV, cache, 0))

  def cond(state):
    i, beams, _, _ = state
    return (i < n_new) & ~beams.done

  def body(state):
    i, beams, token_X, cache = state
    logits_XV, cache = step(cache, token_X, i)
    return (i + 1, *advance(beams, logits_XV, cache, i))

  return _staged_while(model, cond, body, state, N)[1].finished_BWN[:, 0]


@functools.lru_cache(maxsize=32)
def _generate(model, N: int, W: int, sampler: Sampler, stream):
  """The jitted generation for one model and setting; jit keys its compilations on shapes."""

  def run(params, tokens_BP, segment_ids_BP, n_new, rng, divisors_N, special):
    TRACES["generate"] += 1
    eos_id, pad_id = special[0], special[1]  # traced: one compilation serves any ids
    if isinstance(model, GPT):
      logits_XV, cache, step = _prefill_gpt(model, params, tokens_BP, segment_ids_BP,
                                            tokens_BP.shape[1] + N - 1, W)  # the cache's length
    else:
      logits_XV, cache, step = _prefill_t5(model, params, tokens_BP, segment_ids_BP, N, W,
                                           pad_id)
    if W == 1:
      return _sample_loop(model, step, logits_XV, cache, n_new, N, sampler, eos_id, pad_id, rng,
                          stream)
    return _beam_loop(model, step, logits_XV, cache, n_new, N, W, eos_id, pad_id, divisors_N)

  return jax.jit(run)
