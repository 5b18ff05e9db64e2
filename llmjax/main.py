"""Trains a tiny byte-level GPT on this machine's Python standard library, then samples from it.

    python -m llmjax.main                                # 50 s of training, ~75 s in all on 2 cores
    python -m llmjax.main --steps=300 --text=notes.txt   # 300 steps on another file

The corpus needs no download: the sources of a dozen standard-library modules of the running
Python, the last 5% held out for validation. Bytes are the tokens (vocab 256). It prints the
falling train and validation loss (nats per byte), then a sample continuing --prompt generated
with the model's KV cache. The pieces (builtin_corpus, train, generate) import into a notebook.
A full trainer replaces this demo later.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import linen as nn

from llmjax.data.sources import STDLIB_FILES
from llmjax.models.gpt import GPT, GPTConfig

VAL_FRACTION = 0.05


def builtin_corpus() -> bytes:
  """The concatenated sources of STDLIB_FILES (about 1 MB), read from this Python's install."""
  root = os.path.dirname(os.__file__)
  paths = [os.path.join(root, name) for name in STDLIB_FILES]
  paths = [p for p in paths if os.path.isfile(p)]  # a stripped install may lack a few
  if not paths:
    raise FileNotFoundError(f"no standard-library sources under {root}; pass --text=FILE")
  return b"".join(open(p, "rb").read() for p in paths)


def read_text(path: str, seq_len: int) -> bytes:
  """The bytes of `path`, with an error naming it if it is missing or too short to train on."""
  if not os.path.isfile(path):
    problem = "not a file" if os.path.exists(path) else "no such file"
    raise ValueError(f"--text={path}: {problem}")
  with open(path, "rb") as f:
    data = f.read()
  split_data(data, seq_len, where=f"--text={path}")
  return data


def split_data(data: bytes, seq_len: int, where: str = "data") -> tuple[np.ndarray, np.ndarray]:
  """(train, val) uint8 arrays: the last 5% (at least one window) is the validation set."""
  n_val = max(int(len(data) * VAL_FRACTION), seq_len + 1)
  if len(data) - n_val < seq_len + 1:
    raise ValueError(f"{where}: {len(data)} bytes is too short for --seq_len={seq_len}; need at "
                     f"least {2 * (seq_len + 1)} (one window each for training and validation)")
  array = np.frombuffer(data, np.uint8)
  return array[:-n_val], array[-n_val:]


def random_windows(rng: np.random.Generator, data: np.ndarray, batch_size: int,
                   seq_len: int) -> np.ndarray:
  """[batch_size, seq_len + 1] int32 windows of `data` at uniformly random offsets."""
  starts_B = rng.integers(0, len(data) - seq_len, size=batch_size)
  return data[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def loss_fn(params, model: GPT, windows_BT1: jax.Array, dropout_key=None) -> jax.Array:
  """Mean next-byte cross-entropy (nats) of `model` on windows: tokens [:, :-1], targets [:, 1:]."""
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  logits_BTV = model.apply({"params": params}, windows_BT1[:, :-1], rngs=rngs,
                           deterministic=dropout_key is None)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, windows_BT1[:, 1:]).mean()


def train(cfg: GPTConfig, data: bytes, *, batch_size: int = 8, seq_len: int = 128,
          steps: int | None = None, seconds: float | None = None, learning_rate: float = 2e-3,
          seed: int = 0, log_every: int = 25, eval_every: int = 100, log=print):
  """Trains GPT(cfg) on random windows of `data`; returns (params, history).

  Stops after `steps` steps or `seconds` of training (compilation excluded), whichever comes
  first. Warmup and cosine decay run on progress = max(step / steps, time / seconds), so a time
  budget still gets the whole schedule. `history` holds one dict per log line: step, seconds,
  train_loss (mean since the last line) and tokens_per_s, and val_loss where evaluated (step 0,
  every `eval_every` steps and at the end).
  """
  if steps is None and seconds is None:
    raise ValueError("train: give steps, seconds or both")
  train_data, val_data = split_data(data, seq_len)
  model = GPT(cfg)
  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  # Jitted, because eagerly init compiles each of its many small ops on its own (~10 s).
  params = nn.meta.unbox(jax.jit(model.init)(key, jnp.zeros((1, seq_len), jnp.int32))["params"])
  tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(learning_rate, b2=0.99, weight_decay=0.1,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))))(learning_rate=0.0)
  # 1000 schedule units of progress; 5% warmup, decay to a tenth of the peak.
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, 50, 1000, learning_rate / 10)
  state = {"params": params, "opt_state": tx.init(params), "key": key}

  evaluate = jax.jit(lambda params, windows_BT1: loss_fn(params, model, windows_BT1))

  @jax.jit(donate_argnums=0)
  def train_step(state, windows_BT1, lr):
    key, dropout_key = state["key"], None
    if cfg.dropout_rate > 0:  # without dropout the step has no random-number work to compile
      key, dropout_key = jax.random.split(key)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], model, windows_BT1, dropout_key)
    opt_state = state["opt_state"]
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = tx.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "key": key}, loss

  # Up to 64 fixed windows spread over the validation bytes, so evaluations are comparable.
  val_starts = np.linspace(0, len(val_data) - seq_len - 1, min(64, len(val_data) // (seq_len + 1)))
  val_BT1 = val_data[val_starts.astype(int)[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  history = [{"step": 0, "seconds": 0.0, "val_loss": float(evaluate(params, val_BT1))}]
  log(f"step {0:5d} | val loss {history[0]['val_loss']:.3f}")
  step, train_time, losses, clock, timed_steps = 0, 0.0, [], 0.0, 0

  def progress():
    return max(step / steps if steps else 0.0, train_time / seconds if seconds else 0.0)

  while progress() < 1.0:
    lr = float(schedule(int(1000 * progress())))
    batch_BT1 = random_windows(rng, train_data, batch_size, seq_len)
    tic = time.perf_counter()
    state, loss = train_step(state, batch_BT1, lr)
    losses.append(float(loss))  # waits for the step, so the clock is honest
    step, dt = step + 1, time.perf_counter() - tic
    if step == 1:  # that step compiled train_step: report it, keep it off the clocks
      log(f"compiled and ran the first train step in {dt:.1f} s")
    else:  # only train steps count: evaluation and logging are off the clocks too
      train_time, clock, timed_steps = train_time + dt, clock + dt, timed_steps + 1
    if step % log_every == 0 or progress() >= 1.0:
      record = {"step": step, "seconds": train_time, "train_loss": float(np.mean(losses)),
                "tokens_per_s": timed_steps * batch_size * seq_len / max(clock, 1e-9)}
      line = (f"step {step:5d} | train loss {record['train_loss']:.3f} | lr {lr:.1e} | "
              f"{record['tokens_per_s'] / 1e3:5.1f}k tok/s | {train_time:5.1f} s")
      if step % eval_every == 0 or progress() >= 1.0:
        record["val_loss"] = float(evaluate(state["params"], val_BT1))
        line += f" | val loss {record['val_loss']:.3f}"
      history.append(record)
      log(line)
      losses, clock, timed_steps = [], 0.0, 0
  return state["params"], history


@jax.jit(static_argnums=(0, 1))
def _empty_cache(model: GPT, window: int):
  """A KV cache for `window` tokens; returning only it lets XLA drop the parameter initializers."""
  return model.init(jax.random.key(0), jnp.zeros((1, window), jnp.int32))["cache"]


@jax.jit(static_argnums=(0, 4))
def _feed(model: GPT, params, cache, token_11: jax.Array, temperature: float, key: jax.Array):
  """Appends one token to the KV cache; returns the token sampled to follow it, and the cache."""
  logits_11V, variables = model.apply({"params": params, "cache": cache}, token_11,
                                      mutable=["cache"])
  if temperature == 0:
    return jnp.argmax(logits_11V[:, -1], axis=-1), variables["cache"]
  return jax.random.categorical(key, logits_11V[:, -1] / temperature), variables["cache"]


def generate(cfg: GPTConfig, params, prompt: bytes, num_bytes: int, temperature: float = 0.8,
             seed: int = 0) -> bytes:
  """`num_bytes` bytes continuing `prompt`, sampled one at a time with the KV cache.

  Temperature 0 is greedy. Tokens go in one at a time, the prompt too, so one compiled step
  serves all. The cache holds cfg.max_seq_len positions; when it is full it restarts with the
  last half of the text so far (refed), and generation goes on from there.
  """
  if not prompt:
    raise ValueError("generate: the prompt must hold at least one byte")
  model, window = GPT(cfg, decode=True), cfg.max_seq_len
  empty_cache = _empty_cache(model, window)
  text, key = list(prompt), jax.random.key(seed)
  start = pos = max(0, len(text) - window)  # the cache holds text[start:pos]
  cache = empty_cache
  while len(text) < len(prompt) + num_bytes:
    if pos - start == window:
      start = pos = pos - window // 2
      cache = empty_cache
    next_1, cache = _feed(model, params, cache, jnp.array([[text[pos]]]), temperature,
                          jax.random.fold_in(key, pos))
    pos += 1
    if pos == len(text):  # the prompt is in: what the step sampled is the next byte
      text.append(int(next_1[0]))
  return bytes(text[len(prompt):])


FLAGS = flags.FLAGS
flags.DEFINE_float("seconds", 50.0, "Training time budget in seconds (compilation excluded).")
flags.DEFINE_integer("steps", None, "Train this many steps instead of for --seconds.")
flags.DEFINE_integer("seed", 0, "Seed for the parameters, the batches and the sample.")
flags.DEFINE_string("text", None, "Train on this file's bytes instead of the built-in corpus.")
flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
flags.DEFINE_integer("seq_len", 128, "Bytes per window; also the model's context length.")
flags.DEFINE_float("learning_rate", 2e-3, "Peak AdamW learning rate.")
flags.DEFINE_string("prompt", "def ", "Text the sample continues.")
flags.DEFINE_integer("sample_bytes", 300, "Bytes to generate at the end.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")


def main(argv):
  del argv
  if FLAGS.text:
    try:
      data = read_text(FLAGS.text, FLAGS.seq_len)
    except (OSError, ValueError) as e:
      raise SystemExit(f"llmjax.main: {e}") from None
    print(f"corpus: {len(data):,} bytes of {FLAGS.text}")
  else:
    data = builtin_corpus()
    print(f"corpus: {len(data):,} bytes of Python standard-library sources "
          f"({os.path.dirname(os.__file__)})")
  cfg = GPTConfig.from_size("tiny", d_model=128, num_layers=4, num_heads=4,
                            max_seq_len=FLAGS.seq_len, dropout_rate=0.0)
  seconds = FLAGS.seconds if FLAGS.steps is None or FLAGS["seconds"].present else None
  print(f"model: byte-level GPT, d_model {cfg.d_model}, {cfg.num_layers} layers, "
        f"{cfg.num_heads} heads, context {cfg.max_seq_len}; training on batches of "
        f"{FLAGS.batch_size} x {FLAGS.seq_len} bytes for "
        + " or ".join(([f"{FLAGS.steps} steps"] if FLAGS.steps else [])
                      + ([f"{seconds:g} s"] if seconds else [])))
  params, history = train(cfg, data, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                          steps=FLAGS.steps, seconds=seconds, learning_rate=FLAGS.learning_rate,
                          seed=FLAGS.seed)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rate = np.mean([h["tokens_per_s"] for h in history if "tokens_per_s" in h])
  print(f"\n{num_params:,} parameters, {history[-1]['step']} steps, {rate / 1e3:.1f}k tokens/s")
  print(f"validation loss {history[0]['val_loss']:.3f} -> {history[-1]['val_loss']:.3f} nats per "
        f"byte ({history[-1]['val_loss'] / np.log(2):.2f} bits; uniform is {np.log(256):.3f})")
  prompt = FLAGS.prompt.encode()
  sample = generate(cfg, params, prompt, FLAGS.sample_bytes, FLAGS.temperature, FLAGS.seed)
  print(f"\nsample (temperature {FLAGS.temperature:g}):\n"
        + (prompt + sample).decode("utf-8", errors="replace"))


if __name__ == "__main__":
  app.run(main)
