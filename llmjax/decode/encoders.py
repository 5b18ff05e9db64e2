"""Inference with encoders: BERT's fill-mask, and sentence embeddings (BERT, T5's encoder)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models.bert import Bert
from llmjax.models.t5 import T5

BERT_MASK_ID = 103  # [MASK] in BERT's own WordPiece vocabularies (and all-MiniLM's)


def check_vocab(who: str, ids: np.ndarray, vocab_size: int) -> None:
  """Raises ValueError naming the first id of `ids` outside [0, vocab_size)."""
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)][0]
    raise ValueError(f"{who}: token id {int(bad)} is outside the model's vocabulary "
                     f"[0, {vocab_size})")


def _padded(tokens, segment_ids, who: str, vocab_size: int):
  """tokens as an int32 [B, T] array (a list of rows is right-padded) and its segment ids."""
  if isinstance(tokens, (list, tuple)):
    rows = [np.asarray(r, np.int64).reshape(-1) for r in tokens]
    if not rows or min(len(r) for r in rows) == 0:
      raise ValueError(f"{who}: every row needs at least one token")
    T = max(len(r) for r in rows)
    segment_ids = np.array([[1] * len(r) + [0] * (T - len(r)) for r in rows], np.int32)
    tokens = np.array([np.pad(r, (0, T - len(r))) for r in rows])
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise ValueError(f"{who}: tokens must be int [batch, length] (or a list of token lists), "
                     f"got shape {tokens.shape}")
  check_vocab(who, tokens, vocab_size)
  segment_ids = np.ones(tokens.shape, np.int32) if segment_ids is None else np.asarray(segment_ids)
  if segment_ids.shape != tokens.shape:
    raise ValueError(f"{who}: segment_ids has shape {segment_ids.shape} but tokens have "
                     f"{tokens.shape}")
  return tokens.astype(np.int32), segment_ids.astype(np.int32)


def fill_mask(model, params, tokens, top_k: int = 5, *, mask_id: int = BERT_MASK_ID,
              segment_ids=None, token_types=None):
  """The `top_k` likeliest ids and their probabilities at each `mask_id` position, [B, M, k],
  as transformers' fill-mask pipeline (softmax over the vocabulary, best first). M is the most
  masks in a row; a row with fewer has ids -1, probabilities 0 after its own. `segment_ids`
  (0: padding) default to all ones; a list of rows is padded for you."""
  if not isinstance(model, Bert) or model.cfg.head != "mlm":
    raise ValueError(f"fill_mask: needs a Bert with its MLM head (head='mlm'), got "
                     f"{type(model).__name__}")
  if int(top_k) != top_k or not 1 <= top_k <= model.cfg.vocab_size:
    raise ValueError(f"fill_mask: top_k={top_k}; expected 1..{model.cfg.vocab_size}")
  tokens, segment_ids = _padded(tokens, segment_ids, "fill_mask", model.cfg.vocab_size)
  is_mask = (tokens == mask_id) & (segment_ids > 0)
  if not is_mask.any():
    raise ValueError(f"fill_mask: no token is the mask id {mask_id}; pass mask_id= for your "
                     f"tokenizer's mask")
  M = int(is_mask.sum(axis=1).max())
  # Each row's mask positions first, in order; padding slots point at position 0 and are dropped.
  order = np.argsort(~is_mask, axis=1, kind="stable")[:, :M]
  valid = np.take_along_axis(is_mask, order, axis=1)
  types = None if token_types is None else jnp.asarray(token_types, jnp.int32)
  ids, probs = _fill_mask(model, top_k)(params, tokens, segment_ids, types, order)
  return jnp.where(valid[..., None], ids, -1), jnp.where(valid[..., None], probs, 0.0)


@functools.lru_cache(maxsize=16)
def _fill_mask(model, top_k: int):
  @jax.jit
  def run(params, tokens_BT, segment_ids_BT, types_BT, order_BM):
    logits_BTV = model.apply({"params": params}, tokens_BT, segment_ids_BT, types_BT)
    logits_BMV = jnp.take_along_axis(logits_BTV, order_BM[..., None], axis=1)
    probs_BMk, ids_BMk = jax.lax.top_k(jax.nn.softmax(logits_BMV, axis=-1), top_k)
    return ids_BMk.astype(jnp.int32), probs_BMk
  return run


def embed(model, params, tokens, segment_ids=None, pooling: str = "mean",
          normalize: bool = True):
  """Sentence embeddings [B, D] from a Bert's final hidden states (any head) or T5's encoder:
  pooling "mean" over the real tokens (segment_ids > 0) or "cls" (the first token's);
  `normalize` scales each to unit L2 norm (sentence-transformers' Normalize)."""
  if not isinstance(model, (Bert, T5)):
    raise ValueError(f"embed: needs a Bert or T5 encoder, got {type(model).__name__}")
  if pooling not in ("mean", "cls"):
    raise ValueError(f"embed: pooling={pooling!r}; expected 'mean' or 'cls'")
  tokens, segment_ids = _padded(tokens, segment_ids, "embed", model.cfg.vocab_size)
  return _embed(model, pooling, bool(normalize))(params, tokens, segment_ids)


@functools.lru_cache(maxsize=16)
def _embed(model, pooling: str, normalize: bool):
  @jax.jit
  def run(params, tokens_BT, segment_ids_BT):
    method = "hidden" if isinstance(model, Bert) else "encode"
    h_BTD = model.apply({"params": params}, tokens_BT, segment_ids_BT,
                        method=method).astype(jnp.float32)
    if pooling == "cls":
      v_BD = h_BTD[:, 0]
    else:
      real_BT1 = (segment_ids_BT > 0)[..., None].astype(jnp.float32)
      v_BD = (h_BTD * real_BT1).sum(axis=1) / jnp.maximum(real_BT1.sum(axis=1), 1e-9)
    if normalize:  # torch.nn.functional.normalize: v / max(|v|, 1e-12)
      v_BD = v_BD / jnp.maximum(jnp.linalg.norm(v_BD, axis=-1, keepdims=True), 1e-12)
    return v_BD
  return run
