"""A tiny GPT briefly trained on a token stream, for the tests that need one that has learned
something (sampling, quantization)."""

import jax
import numpy as np
import optax
from flax import linen as nn


def fit(model, params, ids: np.ndarray, steps: int, length: int, batch: int, lr: float = 3e-3):
  """(params, last loss) after `steps` Adam steps on `batch` random windows of `length` + 1
  tokens of `ids` (the model predicts each window's next tokens)."""
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, windows_BT1):
    def loss_fn(p):
      logits = model.apply({"params": p}, windows_BT1[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, windows_BT1[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  params = nn.meta.unbox(params)
  rng, opt_state = np.random.default_rng(0), tx.init(params)
  for _ in range(steps):
    starts = rng.integers(0, len(ids) - length - 1, batch)
    params, opt_state, loss = step(params, opt_state, ids[starts[:, None] + np.arange(length + 1)])
  return params, float(loss)
