"""Beam search with transformers' semantics, as pure array updates for a compiled loop.

As transformers' vectorized `_beam_search` (early_stopping=False): each step keeps a row's
2 * num_beams best continuations; the best num_beams that do not end (EOS, or the last allowed
token) run on; those that end ranked in the top num_beams join the finished hypotheses, scored
sum(log p) / length ** length_penalty (the EOS counted). A row is done once every finished slot
is filled and its best running beam, at the current length, cannot beat the worst. Scores use
transformers' -1e9 sentinels, in float32."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1.0e9  # transformers' score for "not a candidate"


class Beams(NamedTuple):
  """Search state of B rows with W beams each and room for N new tokens."""
  running_BWN: jax.Array  # the running beams' tokens so far (pad beyond)
  running_scores_BW: jax.Array  # their summed log-probabilities
  finished_BWN: jax.Array  # the best finished hypotheses, best first
  finished_scores_BW: jax.Array  # their length-penalized scores (_NEG: an empty slot)
  is_finished_BW: jax.Array
  improvable_B1: jax.Array  # transformers' is_early_stop_heuristic_unsatisfied

  @property
  def done(self) -> jax.Array:
    return ~jnp.any(self.improvable_B1)


def init(batch: int, num_beams: int, max_new_tokens: int, pad_id: jax.Array) -> Beams:
  """Every beam of a row starts equal; only the first scores 0, so step 0 draws from it alone."""
  tokens_BWN = jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32)
  running_scores_BW = jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(_NEG)
  return Beams(tokens_BWN, running_scores_BW, tokens_BWN,
               jnp.full((batch, num_beams), _NEG, jnp.float32),
               jnp.zeros((batch, num_beams), bool), jnp.ones((batch, 1), bool))


def length_divisors(max_new_tokens: int, length_penalty: float) -> np.ndarray:
  """length ** length_penalty for lengths 1..N, as transformers computes it (float64, on the
  host), rounded once to float32, so scores divide by the very same numbers."""
  return (np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty).astype(np.float32)


def _gather(x_BW, index_BK):
  index = index_BK.reshape(index_BK.shape + (1,) * (x_BW.ndim - 2))
  return jnp.take_along_axis(x_BW, index, axis=1)


def step(beams: Beams, logits_BWV: jax.Array, i: jax.Array, last: jax.Array,
         eos_id: jax.Array, divisors_N: jax.Array) -> tuple[Beams, jax.Array, jax.Array]:
  """Advances the search by the token at new position `i` (`last`: none may follow; eos_id -1:
  none). Returns the new state, the running beams' next tokens [B, W] and, per new running beam,
  the flat index (row * W + beam) of the beam it extends, to reorder the KV cache by."""
  B, W, V = logits_BWV.shape
  log_probs_BWV = jax.nn.log_softmax(logits_BWV.astype(jnp.float32), axis=-1)
  total_BX = (log_probs_BWV + beams.running_scores_BW[:, :, None]).reshape(B, W * V)
  top_scores_BK, top_index_BK = jax.lax.top_k(total_BX, 2 * W)
  source_BK, token_BK = top_index_BK // V, (top_index_BK % V).astype(jnp.int32)
  top_tokens_BKN = _gather(beams.running_BWN, source_BK).at[:, :, i].set(token_BK)
  ends_BK = last | (token_BK == eos_id)  # eos_id -1: none

  # The best non-ending continuations run on.
  running_scores_BK = top_scores_BK + ends_BK.astype(jnp.float32) * _NEG
  keep_BW = jax.lax.top_k(running_scores_BK, W)[1]
  running_BWN = _gather(top_tokens_BKN, keep_BW)
  running_scores_BW = _gather(running_scores_BK, keep_BW)
  parent_BW = _gather(source_BK, keep_BW) + jnp.arange(B)[:, None] * W

  # Ending continuations among the top W join the finished hypotheses if they rank there.
  just_finished_BK = ends_BK & (jnp.arange(2 * W) < W)[None, :]
  final_scores_BK = top_scores_BK / divisors_N[i]
  final_scores_BK = final_scores_BK + (~beams.improvable_B1).astype(jnp.float32) * _NEG
  final_scores_BK = final_scores_BK + (~just_finished_BK).astype(jnp.float32) * _NEG
  merged_scores = jnp.concatenate([beams.finished_scores_BW, final_scores_BK], axis=1)
  best_BW = jax.lax.top_k(merged_scores, W)[1]
  finished_BWN = _gather(jnp.concatenate([beams.finished_BWN, top_tokens_BKN], axis=1), best_BW)
  finished_scores_BW = _gather(merged_scores, best_BW)
  is_finished_BW = _gather(jnp.concatenate([beams.is_finished_BW, just_finished_BK], axis=1),
                           best_BW)

  # Can a running beam still beat the worst finished one (judged at the current length)?
  best_running_B1 = running_scores_BW[:, :1] / divisors_N[i]
  worst_BW = jnp.where(is_finished_BW, finished_scores_BW.min(axis=1, keepdims=True), _NEG)
  improvable_B1 = beams.improvable_B1 & jnp.any(best_running_B1 > worst_BW, axis=-1,
                                                keepdims=True)
  beams = Beams(running_BWN, running_scores_BW, finished_BWN, finished_scores_BW,
                is_finished_BW, improvable_B1)
  return beams, running_BWN[:, :, i], parent_BW.reshape(B * W)
