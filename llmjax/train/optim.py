"""Optimizers and learning-rate schedules from the config's `optimizer` section."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("adamw", "adafactor")


def schedule(opt, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine / linear decay to
  `final_learning_rate` at `total_steps`, rsqrt decay (T5: lr * sqrt(warmup / step)), or constant."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; expected one of {SCHEDULES}")
  peak, warmup = opt.learning_rate, min(opt.warmup_steps, total_steps)  # a short run: all warmup
  if warmup < 0:
    raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0")
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(total_steps - warmup, 1)
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.final_learning_rate / peak)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(peak, opt.final_learning_rate, decay_steps)
  elif opt.schedule == "rsqrt":
    after = lambda step: peak * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [warmup])


def decay_mask(params):
  """Weight decay on matrices only: not on biases, norm scales or other vectors."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, schedule): global-norm clipping, then AdamW or Adafactor with masked decay."""
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={opt.name!r}; expected one of {OPTIMIZERS}")
  lr = schedule(opt, total_steps)
  if opt.name == "adamw":
    tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     mask=decay_mask)
  else:
    tx = optax.adafactor(lr, weight_decay_rate=opt.weight_decay or None,
                         weight_decay_mask=decay_mask)
  if opt.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  return tx, lr
