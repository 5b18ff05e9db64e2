"""Optimizers and learning-rate schedules from the config's `optimizer` section."""

import jax
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("adamw", "adafactor")


def number(test, text):
  """A range check (test, what it expects) of a number, never a bool; config.py's too."""
  return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v), text


def int_at_least(low):
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an int >= {low}"


# The range of every field of the `optimizer` section (NaN fails every one).
CHECKS = {
    "name": (lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
    "learning_rate": number(lambda v: v > 0, "> 0"),
    "final_learning_rate": number(lambda v: v >= 0, ">= 0"),
    "warmup_steps": int_at_least(0),
    "b1": number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": number(lambda v: v > 0, "> 0"),
    "weight_decay": number(lambda v: v >= 0, ">= 0"),
    "clip_norm": number(lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "microbatches": int_at_least(1),
    # The schedule's length (None: train.steps); a resumed run keeps its first run's.
    "decay_steps": (lambda v: v is None or (isinstance(v, int) and v >= 1), "None or an int >= 1"),
}


def check(opt, fields=tuple(CHECKS)) -> None:
  """Raises ValueError naming the first of `fields` of the optimizer section out of range:
  `optimizer.learning_rate=-0.001 must be > 0`."""
  for name in fields:
    if name not in opt:
      raise ValueError(f"the config has no field optimizer.{name}")
    test, expected = CHECKS[name]
    if not test(opt[name]):
      raise ValueError(f"optimizer.{name}={opt[name]!r} must be {expected}")


def schedule(opt, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine / linear decay to
  `final_learning_rate` at `total_steps`, rsqrt decay (T5: lr * sqrt(warmup / step)), or constant."""
  check(opt, ("schedule", "learning_rate", "final_learning_rate", "warmup_steps"))
  if total_steps < 0:
    raise ValueError(f"total_steps={total_steps} (train.steps) must be >= 0")
  peak, warmup = opt.learning_rate, min(opt.warmup_steps, total_steps)  # a short run: all warmup
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
  check(opt)
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
