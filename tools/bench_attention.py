"""Times the flash-attention kernel against XLA attention, forward and forward + backward.

    python tools/bench_attention.py                       # the default grid, causal + segments
    python tools/bench_attention.py --shapes=4x2048x16x128,1x8192x8x128 --dtype=bfloat16 --bias
    python tools/bench_attention.py --targets=all --shapes=1x4096x8x128   # no accelerator needed

Each shape is BxTxHxD (self-attention, G = H unless --kv_heads). On TPU or GPU it prints
milliseconds per call (median of --repeats after a warm-up) and the kernel's speed-up, and on
GPU also cuDNN's (`jax.nn.dot_product_attention`, where it supports the case). On CPU the
kernel only runs in the Pallas interpreter, so timings there mean nothing: it checks the
kernel against the reference instead (max abs difference of outputs and gradients) and says
that timings need an accelerator.

--targets compiles the gradient (forward, dq and dk/dv kernels) for accelerators this machine
lacks (llmjax/kernels/targets.py; the `targets` extra) and prints what the compiled program
tells: compile time, and per GPU kernel the shared memory, registers, spilled bytes (ptxas)
and asynchronous copies (software pipelining), or the one line refusing blocks that do not
fit the target.
"""

from __future__ import annotations

import os
import sys
import time

if any(arg.startswith("--targets") for arg in sys.argv):  # compiling needs no local device
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax.kernels import flash_attention, targets  # noqa: E402
from llmjax.kernels.flash_attention.reference import attention_reference  # noqa: E402

flags.DEFINE_list("shapes", None, "BxTxHxD shapes; default: 2x1024x8x128, 1x4096x8x128, "
                  "4x512x16x64 on an accelerator, 1x256x4x64, 1x384x2x128 on CPU.")
flags.DEFINE_integer("kv_heads", None, "G (GQA); default: H.")
flags.DEFINE_string("dtype", "bfloat16", "Input dtype.")
flags.DEFINE_bool("causal", True, "Causal attention.")
flags.DEFINE_bool("segments", True, "Two packed sequences per row.")
flags.DEFINE_bool("bias", False, "T5 relative bias (32 buckets).")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
flags.DEFINE_list("targets", None, f"Compile for these targets instead of timing here: "
                  f"{', '.join(targets.NAMES)} or all.")
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


def _grad(f):
  return jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))


def _fns(kwargs):
  kernel = lambda q, k, v: flash_attention(q, k, v, **kwargs)
  xla = lambda q, k, v: attention_reference(q, k, v, **kwargs)
  fns = {"kernel": kernel, "xla": xla}
  if jax.default_backend() == "gpu" and not (FLAGS.segments or FLAGS.bias):
    fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=FLAGS.causal, implementation="cudnn")
  return {**{n: jax.jit(f) for n, f in fns.items()},
          **{f"{n} fwd+bwd": jax.jit(_grad(f)) for n, f in fns.items()}}


def _compile_for_targets(names, shapes):
  """Per target and shape: the compiled gradient's figures, or why the blocks are refused."""
  for name in names:
    sharding = jax.sharding.SingleDeviceSharding(targets.devices(name)[0])
    for shape in shapes:
      qkv, kwargs = _inputs(shape)
      arrays = [n for n, x in kwargs.items() if isinstance(x, jax.Array)]
      static = {n: x for n, x in kwargs.items() if n not in arrays}
      args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
              for x in (*qkv, *(kwargs[n] for n in arrays))]

      def loss(q, k, v, *rest):
        out = flash_attention(q, k, v, interpret=False, target=name, **static,
                              **dict(zip(arrays, rest)))
        return out.astype(jnp.float32).sum()

      start = time.perf_counter()
      try:
        lowered = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args)
        kernels = targets.gpu_kernels(lowered, name) if name in targets.GPUS else {}
        if name in targets.TPUS:
          lowered.compile()
      except ValueError as e:
        print(f"{name:>5} {shape:>16}  refused: {str(e).splitlines()[0]}")
        continue
      print(f"{name:>5} {shape:>16}  compiled in {time.perf_counter() - start:5.1f} s")
      for kernel, used in sorted(kernels.items()):
        print(f"{'':>23}{kernel:<26} shared memory {used['smem']:>7} B, registers "
              f"{used['registers']:>3}, spill stores {used['spill_stores']:>5} B, "
              f"cp.async {used['async_copies']}")


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
  if FLAGS.targets:
    names = targets.NAMES if FLAGS.targets == ["all"] else FLAGS.targets
    unknown = [n for n in names if n not in targets.NAMES]
    if unknown:
      raise app.UsageError(f"--targets: unknown {', '.join(unknown)}; expected "
                           f"{', '.join(targets.NAMES)} or all")
    _compile_for_targets(names, FLAGS.shapes or ["2x1024x8x128", "4x512x16x64"])
    return
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
    print(f"{shape:>16}  " + "  ".join(
        f"{n}: kernel {ms[k]:8.3f} ms, " + ", ".join(
            f"{p} {ms[k.replace('kernel', p)]:8.3f} ms ({ms[k.replace('kernel', p)] / ms[k]:.2f}x)"
            for p in ("xla", "cudnn") if k.replace("kernel", p) in ms)
        for n, k in (("fwd", "kernel"), ("fwd+bwd", "kernel fwd+bwd"))))
  if platform == "cpu":
    print("CPU: the kernel runs in the Pallas interpreter, so only correctness is checked; "
          "timings need a TPU or GPU.")


if __name__ == "__main__":
  app.run(main)
