"""Token choice against transformers' logits warpers: temperature, then top-k, then top-p,
ties included; and sampled tokens follow the filtered distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from llmjax.decode import Sampler

SETTINGS = [(0.7, None, 0.9), (1.0, 5, None), (1.3, 4, 0.5), (0.5, None, 0.3),
            (1.0, 3, 0.999), (2.0, 0, 0.6)]


def _transformers(logits_BV, temperature, top_k, top_p):
  """transformers' warpers in the order `generate` applies them."""
  warpers = LogitsProcessorList()
  if temperature != 1.0:
    warpers.append(TemperatureLogitsWarper(temperature))
  if top_k:
    warpers.append(TopKLogitsWarper(top_k))
  if top_p is not None and top_p < 1.0:
    warpers.append(TopPLogitsWarper(top_p))
  return warpers(None, torch.tensor(logits_BV)).numpy()


def _logits(V, seed):
  """Random float32 logits in which many values tie: integers over 4."""
  return (np.random.default_rng(seed).integers(-8, 8, (6, V)) / 4).astype(np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_equals_transformers_with_ties(temperature, top_k, top_p):
  # Up to 16 entries torch sorts stably, like we do: the kept sets must be identical.
  logits = _logits(12, seed=int(temperature * 10))
  ours = np.asarray(Sampler(temperature, top_k, top_p).filter(jnp.asarray(logits)))
  ref = _transformers(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def _boundary_tie(logits_V, top_p):
  """The logit value whose tied tokens straddle an exact top-p cut, if any: there the cut is
  decided by float rounding of the cumulative sum, which no two summation orders share."""
  if top_p is None or top_p >= 1:
    return None
  kept = np.sort(logits_V[np.isfinite(logits_V)].astype(np.float64))
  cumulative = np.cumsum(np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum())
  near = np.abs(cumulative - (1 - top_p)) < 1e-6
  return kept[near.argmax()] if near.any() else None


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_equals_transformers_on_a_larger_vocabulary(temperature, top_k, top_p):
  """Past 16 entries torch's sort is not stable, so a cut through a tie keeps arbitrary
  members: each row keeps the same multiset of logits, and the same tokens away from ties."""
  checked_ties = 0
  for logits in (_logits(300, seed=1), np.random.default_rng(2).normal(size=(6, 300)) * 3):
    logits = logits.astype(np.float32)
    ours = np.asarray(Sampler(temperature, top_k, top_p).filter(jnp.asarray(logits)))
    ref = _transformers(logits, temperature, top_k, top_p)
    top_k_only = _transformers(logits, temperature, top_k, None)
    for b in range(len(logits)):
      tie = _boundary_tie(top_k_only[b], top_p)
      away = np.ones(logits.shape[1], bool) if tie is None else top_k_only[b] != tie
      checked_ties += np.unique(logits[b], return_counts=True)[1].max() > 1
      np.testing.assert_allclose(np.sort(ours[b][away]), np.sort(ref[b][away]), rtol=1e-6)
      if np.unique(logits[b], return_counts=True)[1].max() == 1:
        np.testing.assert_array_equal(np.isinf(ours[b]), np.isinf(ref[b]))
  assert checked_ties >= 6


def test_greedy_is_argmax_with_the_lowest_id_among_ties():
  logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
  np.testing.assert_array_equal(Sampler().choose(logits, jax.random.key(0)), [1, 0])


def test_sampled_tokens_follow_the_filtered_distribution():
  """A chi-square goodness-of-fit test of 40,000 draws on a vocabulary of 10."""
  logits_1V = jnp.asarray([[2.0, 1.5, 1.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 0.2]])
  sampler = Sampler(0.8, 6, 0.9)
  probs_V = np.asarray(jax.nn.softmax(sampler.filter(logits_1V))[0], np.float64)
  keys = jax.random.split(jax.random.key(0), 40_000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sampler.choose(logits_1V, k)[0]))(keys))
  counts = np.bincount(draws, minlength=10)
  kept = probs_V > 0
  assert counts[~kept].sum() == 0  # a filtered-out token is never drawn
  assert kept.sum() >= 3
  chi2 = ((counts[kept] - len(draws) * probs_V[kept]) ** 2 / (len(draws) * probs_V[kept])).sum()
  assert chi2 < stats.chi2.ppf(0.999, kept.sum() - 1), (chi2, counts, probs_V)
