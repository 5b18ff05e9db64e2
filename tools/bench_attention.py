"""Times the flash-attention kernel against XLA attention, forward and forward + backward.

    python tools/bench_attention.py                       # the default grid, causal + segments
    python tools/bench_attention.py --shapes=4x2048x16x128,1x8192x8x128 --dtype=bfloat16 --bias

Each shape is BxTxHxD (self-attention, G = H unless --kv_heads). On TPU or GPU it prints
milliseconds per call (median of --repeats after a warm-up) and the kernel's speed-up. On CPU
the kernel only runs in the Pallas interpreter, so timings there mean nothing: it checks the
kernel against the reference instead (max abs difference of outputs and gradients) and says
that timings need an accelerator.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llmjax.kernels import flash_attention
from llmjax.kernels.flash_attention.reference import attention_reference

flags.DEFINE_list("shapes", None, "BxTxHxD shapes; default: 2x1024x8x128, 1x4096x8x128, "
                  "4x512x16x64 on an accelerator, 1x256x4x64, 1x384x2x128 on CPU.")
flags.DEFINE_integer("kv_heads", None, "G (GQA); default: H.")
flags.DEFINE_string("dtype", "bfloat16", "Input dtype.")
flags.DEFINE_bool("causal", True, "Causal attention.")
flags.DEFINE_bool("segments", True, "Two packed sequences per row.")
flags.DEFINE_bool("bias", False, "T5 relative bias (32 buckets).")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
FLAGS = flags.FLAGS


def _inputs(shape: str):
  B, T, H, D = (int(x) for x in shape.split("x"))
  G = FLAGS.kv_heads or H
  keys = jax.random.split(jax.random.key(0), 4)
  dtype = jnp.dtype(FLAGS.dtype)
  q = jax.random.normal(keys[0], (B, T, H, D), dtype)
  k = jax.random.normal(keys[1], (B, T, G, D), dtype)
  v = jax.random.normal(keys[2], (B, T, G, D), dtype)
  kwargs = {"causal": FLAGS.causal}
  if FLAGS.segments:
    kwargs["segment_ids"] = jnp.asarray(np.where(np.arange(T) < T // 3, 1, 2)[None].repeat(B, 0))
  if FLAGS.bias:
    kwargs["bias_table"] = jax.random.normal(keys[3], (32, H), jnp.float32)
  return (q, k, v), kwargs


def _fns(kwargs):
  kernel = lambda q, k, v: flash_attention(q, k, v, **kwargs)
  xla = lambda q, k, v: attention_reference(q, k, v, **kwargs)
  grad = lambda f: jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
  return {"kernel": jax.jit(kernel), "xla": jax.jit(xla),
          "kernel fwd+bwd": jax.jit(grad(kernel)), "xla fwd+bwd": jax.jit(grad(xla))}


def _time(fn, args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def main(argv):
  del argv
  platform = jax.default_backend()
  print(f"backend {platform} ({jax.devices()[0].device_kind}), {FLAGS.dtype}, "
        f"causal={FLAGS.causal}, segments={FLAGS.segments}, bias={FLAGS.bias}")
  default = (["1x256x4x64", "1x384x2x128"] if platform == "cpu"
             else ["2x1024x8x128", "1x4096x8x128", "4x512x16x64"])
  for shape in FLAGS.shapes or default:
    args, kwargs = _inputs(shape)
    fns = _fns(kwargs)
    if platform == "cpu":
      out = {name: fn(*args) for name, fn in fns.items()}
      forward = float(jnp.max(jnp.abs(out["kernel"].astype(jnp.float32)
                                      - out["xla"].astype(jnp.float32))))
      grads = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(out["kernel fwd+bwd"], out["xla fwd+bwd"])]
      print(f"{shape:>16}  interpreted kernel vs reference: max |out diff| {forward:.2e}, "
            f"max |dq, dk, dv diff| " + ", ".join(f"{g:.2e}" for g in grads))
      continue
    ms = {name: _time(fn, args) for name, fn in fns.items()}
    print(f"{shape:>16}  fwd: kernel {ms['kernel']:8.3f} ms, xla {ms['xla']:8.3f} ms "
          f"({ms['xla'] / ms['kernel']:.2f}x)  fwd+bwd: kernel {ms['kernel fwd+bwd']:8.3f} ms, "
          f"xla {ms['xla fwd+bwd']:8.3f} ms ({ms['xla fwd+bwd'] / ms['kernel fwd+bwd']:.2f}x)")
  if platform == "cpu":
    print("CPU: the kernel runs in the Pallas interpreter, so only correctness is checked; "
          "timings need a TPU or GPU.")


if __name__ == "__main__":
  app.run(main)
