"""What every objective shares: the weighted cross-entropy and the packed-row bookkeeping.

An objective is a data transform plus the loss it implies. The data pipeline calls
`examples(tokens, rng)` on each document's token ids and packs the examples into rows of
`lengths`; `batch(rows)` names the batched [B, L] features; the trainer calls `logits(...)` and
`loss(...)`. Batches are flat dicts of arrays with the same keys for every objective:

    decoder-only / encoder-only   tokens targets weights segment_ids positions [prefix_mask]
    encoder-decoder               encoder_tokens encoder_segment_ids encoder_positions
                                  decoder_tokens decoder_targets decoder_weights
                                  decoder_segment_ids decoder_positions

`segment_ids` number the packed examples of a row from 1; 0 is padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  axis=None) -> dict[str, jax.Array]:
  """Weighted sums (over `axis`: default all), in float32: `loss` (what is minimized), `nll`,
  `correct` and `weight`.
  `loss` adds label smoothing (the target's probability mass spread uniformly over the
  vocabulary by `label_smoothing`) and PaLM's z-loss `z_loss * log(Z)**2` to the negative log
  likelihood `nll`. Divide a sum by `weight` for the mean over the tokens that count."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  weights_BT = weights_BT.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A one-hot contraction, not a gather: it stays correct and cheap with V split over devices.
  onehot_BTV = jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32)
  nll_BT = log_z_BT - jnp.sum(logits_BTV * onehot_BTV, axis=-1)
  loss_BT = nll_BT
  if label_smoothing:
    smooth_BT = log_z_BT - jnp.mean(logits_BTV, axis=-1)  # cross-entropy with the uniform
    loss_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * smooth_BT
  if z_loss:
    loss_BT = loss_BT + z_loss * jnp.square(log_z_BT)
  correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return {"loss": jnp.sum(loss_BT * weights_BT, axis), "nll": jnp.sum(nll_BT * weights_BT, axis),
          "correct": jnp.sum(correct_BT * weights_BT, axis), "weight": jnp.sum(weights_BT, axis)}


class Objective:
  """Base class: subclasses set `lengths`, `examples`, `model_args`; `batch`, the loss shared.
  The keyword-only arguments of a subclass's `__init__` (and these two of the loss) are its
  settings: the config's `objective` section holds one field per setting (see
  `objectives.from_config`), so a new objective is one class here and one registry entry."""

  def __init__(self, tokenizer, *, z_loss: float = 0.0, label_smoothing: float = 0.0):
    if z_loss < 0 or not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"z_loss={z_loss} must be >= 0 and label_smoothing={label_smoothing} in "
                       f"[0, 1)")
    self.vocab_size, self.tokenizer_fingerprint = tokenizer.vocab_size, tokenizer.fingerprint
    # A dict, so not part of repr: the data pipeline's state does not depend on the loss.
    self.loss_options = {"z_loss": z_loss, "label_smoothing": label_smoothing}

  targets_key, weights_key = "targets", "weights"
  lengths: dict[str, int]
  # Whether an example may be cut across rows (packing="concat") and keep its meaning.
  splittable = False
  # The model architectures (a model class's ARCHITECTURE) the objective trains.
  architectures: tuple[str, ...] = ("decoder",)

  def __repr__(self):
    """The class and its settings: stable across runs, so pipeline states can be checked."""
    settings = {k: v for k, v in sorted(vars(self).items())
                if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"

  def for_eval(self) -> "Objective":
    """The objective the eval split is read with: this one, less training-only randomness."""
    return self

  def check_model(self, model) -> None:
    """Raises ValueError if the model is of an architecture the objective does not train (a
    module without ARCHITECTURE is trusted), or its embedding table lacks some of our ids."""
    arch = getattr(model, "ARCHITECTURE", None)
    if arch is not None and arch not in self.architectures:
      raise ValueError(f"{type(self).__name__} trains {' or '.join(self.architectures)} models, "
                       f"not {type(model).__name__} ({arch}); "
                       f"{_FITS.get(arch, 'choose another objective')}")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and vocab < self.vocab_size:
      raise ValueError(f"{type(self).__name__} makes ids up to {self.vocab_size - 1} (its "
                       f"tokenizer has {self.vocab_size}) but the model's vocab_size is {vocab}; "
                       f"raise the model's vocab_size to at least {self.vocab_size}")

  def batch(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed decoder-/encoder-only `rows` as a batch: weights their own, else 1 per real token."""
    segment_ids, positions = segments(rows, "tokens")
    weights = rows["weights"] if "weights" in rows else segment_ids > 0
    return {"tokens": rows["tokens"], "targets": rows["targets"],
            "weights": weights.astype(np.float32), "segment_ids": segment_ids,
            "positions": positions}

  def model_args(self, batch) -> tuple[tuple, dict]:
    """(args, kwargs) of the model call for `batch`."""
    raise NotImplementedError

  def logits(self, model, variables, batch, **apply_kwargs):
    """The model's logits for `batch` (apply_kwargs: e.g. deterministic=False, rngs=...)."""
    self.check_model(model)
    args, kwargs = self.model_args(batch)
    return model.apply(variables, *args, **kwargs, **apply_kwargs)

  def init(self, model, rngs, batch):
    """The model's variables, initialized on `batch`'s shapes."""
    self.check_model(model)
    args, kwargs = self.model_args(batch)
    return model.init(rngs, *args, **kwargs)

  def loss(self, logits_BTV, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss over weighted tokens, sums that add across batches) of `batch`'s logits."""
    sums = cross_entropy(logits_BTV, batch[self.targets_key], batch[self.weights_key],
                         **self.loss_options)
    return sums["loss"] / jnp.maximum(sums["weight"], 1.0), sums


_FITS = {"decoder": "a decoder-only model trains with causal_lm or prefix_lm",
         "encoder": "an encoder-only model trains with masked_lm",
         "encoder_decoder": "an encoder-decoder model trains with span_corruption"}


def segments(rows: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions) [B, L] of feature `key` of packed or padded rows."""
  return rows[key + "_segment_ids"], rows[key + "_positions"]


def chunks(tokens: np.ndarray, size: int, overlap: int = 0) -> list[np.ndarray]:
  """Consecutive pieces of at most `size` tokens, each starting `size - overlap` after the last."""
  if size <= overlap:
    raise ValueError(f"chunk size {size} must exceed the overlap {overlap}")
  return [tokens[s:s + size] for s in range(0, max(len(tokens) - overlap, 1), size - overlap)]
