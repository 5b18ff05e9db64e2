"""Training speed against PyTorch: llmjax beside a nanoGPT-style PyTorch GPT, in one run.

    python tools/bench_train.py --data=../shared/data/tinyshakespeare.txt

(a) shakespeare_char, nanoGPT's CPU "baby GPT" (4 layers, 4 heads, d 128, block 64, batch 12,
    2000 steps, AdamW 1e-3 with 100 warmup steps and cosine decay to 1e-4, clipping at 1):
    each run is a fresh process timed from launch to exit (imports, data, compiling, the
    steps, its evals), and its exact validation loss is the mean loss over the whole last
    10% of the text in consecutive 64-character windows. llmjax runs
    experiments/shakespeare_char.py through `python -m llmjax.main` (evals every 250 steps);
    PyTorch runs the model and loop below as nanoGPT writes them (eager, scaled_dot_product_
    attention, fused AdamW where the build has it, random 64-character crops, nanoGPT's CPU
    command: a 20-batch estimate every 250 steps), then the exact loss once. `speedrun` is
    experiments/shakespeare_speedrun.py (the same model and data, its own recipe and
    steps, or --speedrun_steps), timed the same way; `time / torch` divides by PyTorch's seconds.
(b) nanoGPT's 10.65M shape (6 layers, 6 heads, d 384, block 256, batch 64) on the same text,
    at each --shape_dtypes compute precision (float32; bfloat16: PyTorch's CPU autocast,
    llmjax's model.dtype, float32 master weights both): tokens/s over --shape_steps steps
    after the first, and MFU against each framework's own measured matmul peak at that
    precision (the best of 20 1024^3 products), with llmjax's FLOP convention
    (llmjax/metrics.py) for both.
(c) `products`: GF/s of the three products of a projection's training step at that shape
    (64 x 256 rows, d 384 -> 1536; float32 sums): x @ w (forward), g @ w^T (the input's
    gradient), x^T @ g (the weight's), the best of 10 each, and (b)'s 1024^3 peak, XLA:CPU
    beside PyTorch at each --shape_dtypes precision: where a precision's step can go.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import timeit

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("data", "../shared/data/tinyshakespeare.txt", "The text to train on.")
flags.DEFINE_integer("steps", 2000, "shakespeare_char's training steps.")
flags.DEFINE_integer("speedrun_steps", None, "The speedrun's steps (default: its own, 900).")
flags.DEFINE_integer("shape_steps", 20, "Steps timed at the 10.65M shape.")
flags.DEFINE_list("shape_dtypes", ["float32", "bfloat16"], "Compute precisions of (b), (c).")
flags.DEFINE_integer("product_rows", None, "Rows of (c)'s products (default: the shape's "
                     "64 x 256).")
RUNS = ["torch", "llmjax", "speedrun", "torch_shape", "llmjax_shape", "products"]
flags.DEFINE_list("runs", RUNS, "Which runs.")
flags.DEFINE_string("run", None, "Internal: run this one PyTorch measurement in this process.")
FLAGS = flags.FLAGS

BABY = dict(layers=4, heads=4, d=128, block=64, batch=12)
SHAPE = dict(layers=6, heads=6, d=384, block=256, batch=64)


def torch_gpt(vocab: int, layers: int, heads: int, d: int, block: int, **_):
  """nanoGPT's model.py at bias=False, dropout 0: pre-LN blocks, tied embeddings."""
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
      self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
      self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
      B, T, C = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
      q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
      return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
      self.h = nn.ModuleList(Block() for _ in range(layers))
      self.ln_f = nn.LayerNorm(d, bias=False)
      self.lm_head = nn.Linear(d, vocab, bias=False)
      self.lm_head.weight = self.wte.weight
      for name, p in self.named_parameters():
        if p.dim() == 2:
          std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
          torch.nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
      for block in self.h:
        x = block(x)
      logits = self.lm_head(self.ln_f(x))
      return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

  return GPT()


def torch_optimizer(model, lr: float):
  """nanoGPT's configure_optimizers: decay on matrices only, fused AdamW where available."""
  import torch
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  try:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=True)
  except (RuntimeError, TypeError):
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def lr_at(it: int, steps: int, lr=1e-3, min_lr=1e-4, warmup=100) -> float:
  """nanoGPT's get_lr: linear warmup, then cosine decay to min_lr at `steps`."""
  if it < warmup:
    return lr * (it + 1) / (warmup + 1)
  ratio = (it - warmup) / max(steps - warmup, 1)
  return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)


def torch_shakespeare(text: str, steps: int) -> dict:
  """The PyTorch run of (a): nanoGPT's loop, then the exact validation loss."""
  import torch
  torch.manual_seed(1337)
  torch.set_num_threads(os.cpu_count())
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  data = np.array([index[c] for c in text], np.int64)
  cut = int(0.9 * len(data))
  train, val = torch.from_numpy(data[:cut]), torch.from_numpy(data[cut:])
  block, batch = BABY["block"], BABY["batch"]
  model = torch_gpt(len(chars), **BABY)
  opt = torch_optimizer(model, 1e-3)
  gen = torch.Generator().manual_seed(1337)

  def get_batch(split):
    ix = torch.randint(len(split) - block, (batch,), generator=gen)
    return (torch.stack([split[i:i + block] for i in ix]),
            torch.stack([split[i + 1:i + 1 + block] for i in ix]))

  for it in range(steps + 1):
    if it % 250 == 0 or it == steps:  # nanoGPT's estimate: 20 batches of each split
      model.eval()
      with torch.no_grad():
        for split in (train, val):
          for _ in range(20):
            model(*get_batch(split))
      model.train()
    if it == steps:
      break
    for group in opt.param_groups:
      group["lr"] = lr_at(it, steps)
    loss = model(*get_batch(train))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  model.eval()
  total, count = 0.0, 0
  with torch.no_grad():  # the exact loss: consecutive windows over the whole validation text
    n = (len(val) - 1) // block
    x, y = val[:n * block].view(n, block), val[1:n * block + 1].view(n, block)
    for i in range(0, n, 64):
      total += float(model(x[i:i + 64], y[i:i + 64])) * y[i:i + 64].numel()
      count += y[i:i + 64].numel()
  return {"loss": total / count}


def torch_peak(dtype: str) -> float:
  """PyTorch's `dtype` matmul FLOP/s here: the best of 20 1024^3 products."""
  import torch
  a = torch.ones(1024, 1024, dtype=getattr(torch, dtype))
  best = float("inf")
  for _ in range(20):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * 1024 ** 3 / best


def torch_shape(text: str, steps: int, dtype: str) -> dict:
  """A PyTorch run of (b): tokens/s and MFU at the 10.65M shape, computing in `dtype`."""
  import contextlib
  import torch
  from llmjax import metrics
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  data = torch.tensor([index[c] for c in text[:200_000]])
  block, batch = SHAPE["block"], SHAPE["batch"]
  model = torch_gpt(len(chars), **SHAPE)
  opt = torch_optimizer(model, 6e-4)
  times = []
  for it in range(steps + 1):
    ix = torch.randint(len(data) - block - 1, (batch,))
    x = torch.stack([data[i:i + block] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
    start = time.perf_counter()
    with (contextlib.nullcontext() if dtype == "float32" else
          torch.autocast("cpu", dtype=getattr(torch, dtype))):
      loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
  tokens_per_s = block * batch / float(np.mean(times[1:]))
  params = sum(p.numel() for p in model.parameters())
  embed = model.wte.weight.numel() + model.wpe.weight.numel()
  flops = metrics.flops_per_token(params, embed, SHAPE["layers"], block, SHAPE["d"])
  return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / torch_peak(dtype)}


def products(framework: str, dtype: str) -> dict:
  """GF/s of (c)'s products in `framework` ("torch" or "xla") with `dtype` operands; the
  square is the peak (b) divides by (`torch_peak`, llmjax's `metrics.measured_cpu_flops`)."""
  R, D, F = FLAGS.product_rows or SHAPE["batch"] * SHAPE["block"], SHAPE["d"], 4 * SHAPE["d"]
  shapes = {"x": (R, D), "w": (D, F), "g": (R, F)}
  if framework == "torch":
    import torch
    torch.set_num_threads(os.cpu_count())
    x, w, g = (torch.ones(s, dtype=getattr(torch, dtype)) for s in shapes.values())
    run = {"x@w": lambda: x @ w, "g@wT": lambda: g @ w.T, "xT@g": lambda: x.T @ g}
    square = torch_peak(dtype)
  else:
    import jax
    import jax.numpy as jnp
    from llmjax import metrics
    x, w, g = (jnp.ones(s, dtype) for s in shapes.values())

    def dot(p, q, contract):  # contracting dims (of p, of q), summed in float32
      f = jax.jit(lambda p, q: jax.lax.dot_general(p, q, ((contract[:1], contract[1:]), ((), ())),
                                                   preferred_element_type=jnp.float32))
      return lambda: f(p, q).block_until_ready()
    run = {"x@w": dot(x, w, (1, 0)), "g@wT": dot(g, w, (1, 1)), "xT@g": dot(x, g, (0, 0))}
    square = metrics.measured_cpu_flops(dtype=dtype)
  out = {}
  for name, f in run.items():  # each 2 R D F FLOPs
    f()
    out[name] = 2 * R * D * F / min(timeit.repeat(f, number=1, repeat=10)) / 1e9
  return out | {"1024^3": square / 1e9}


def launch(args: list[str], env=None) -> tuple[float, str]:
  """(seconds from launch to exit, stdout) of a fresh Python process; fails loudly."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"bench_train: {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
  return seconds, proc.stdout


def llmjax_run(workdir: str, vocab: int, overrides: list[str],
               experiment: str = "shakespeare_char") -> tuple[float, list[dict]]:
  """(whole-process seconds, metrics.jsonl records) of experiments/EXPERIMENT.py with
  `overrides`; a fresh compilation cache, so nothing compiled before is reused."""
  seconds, _ = launch(["-m", "llmjax.main", f"--config=experiments/{experiment}.py",
                       f"--workdir={workdir}", f"--config.data.path={FLAGS.data}",
                       f"--config.model.vocab_size={vocab}",
                       "--config.train.sample_tokens=0", *overrides],
                      env={"JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, "cache")})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return seconds, [json.loads(line) for line in f]


def main(argv):
  del argv
  FLAGS.data = os.path.abspath(FLAGS.data)
  with open(FLAGS.data, encoding="utf-8") as f:
    text = f.read()
  if FLAGS.run:  # one PyTorch measurement, in a process of its own
    run = {"torch": lambda: torch_shakespeare(text, FLAGS.steps),
           "torch_shape": lambda: torch_shape(text, FLAGS.shape_steps,
                                              FLAGS.shape_dtypes[0]),
           "torch_products": lambda: products("torch", FLAGS.shape_dtypes[0]),
           "xla_products": lambda: products("xla", FLAGS.shape_dtypes[0])}[FLAGS.run]
    print(json.dumps(run()))
    return
  unknown = sorted(set(FLAGS.runs) - set(RUNS))
  bad = sorted(set(FLAGS.shape_dtypes) - {"float32", "bfloat16"})
  if bad:
    raise SystemExit(f"bench_train: unknown --shape_dtypes {', '.join(bad)}; expected float32 "
                     f"or bfloat16")
  if unknown:
    raise SystemExit(f"bench_train: unknown --runs {', '.join(unknown)}; expected one of "
                     f"{', '.join(RUNS)}")
  results, work = {}, tempfile.mkdtemp(prefix="bench_train_")
  try:
    _measure(results, work, len(set(text)))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  _print(results)


def _measure(results: dict, work: str, vocab: int) -> None:
  for run in FLAGS.runs:
    for dtype in FLAGS.shape_dtypes if run.endswith(("_shape", "products")) else [None]:
      name = f"{run} {dtype}" if dtype else run
      print(f"running {name} ...", flush=True)
      results[name] = _one(run, dtype, os.path.join(work, name.replace(" ", "_")), vocab)


def _one(run: str, dtype: str | None, workdir: str, vocab: int) -> dict:
  def child(run):  # a measurement in a process of its own
    seconds, out = launch([os.path.abspath(__file__), f"--run={run}", f"--data={FLAGS.data}",
                           f"--steps={FLAGS.steps}", f"--shape_steps={FLAGS.shape_steps}",
                           f"--product_rows={FLAGS.product_rows or 0}",
                           *[f"--shape_dtypes={dtype}"] * bool(dtype)])
    return {"seconds": seconds, **json.loads(out.strip().splitlines()[-1])}
  if run in ("torch", "torch_shape"):
    return child(run)
  if run == "products":
    return {"torch": child("torch_products"), "xla": child("xla_products")}
  if run == "llmjax":
    seconds, records = llmjax_run(workdir, vocab, [f"--config.train.steps={FLAGS.steps}"])
  elif run == "speedrun":
    steps = FLAGS.speedrun_steps
    seconds, records = llmjax_run(workdir, vocab, [f"--config.train.steps={steps}",
                                                   f"--config.train.eval_every={steps}"]
                                  if steps else [], "shakespeare_speedrun")
  if run in ("llmjax", "speedrun"):
    return {"seconds": seconds,
            "loss": [r["eval/loss"] for r in records if "eval/loss" in r][-1]}
  n = FLAGS.shape_steps
  _, records = llmjax_run(workdir, vocab, [
      "--config.model.num_layers=6", "--config.model.num_heads=6",
      "--config.model.d_model=384", "--config.model.max_seq_len=256",
      f"--config.model.dtype={dtype}", "--config.objective.length=256",
      "--config.batch_size=64", f"--config.train.steps={n + 1}",
      f"--config.train.log_every={n + 1}", "--config.train.eval_every=0",
      f"--config.train.checkpoint_every={n + 1}"])
  last = records[-1]  # the window's rates (the trainer times steps, compiles aside)
  return {"tokens_per_s": last["train/tokens_per_sec"], "mfu": last["train/mfu"]}


def _print(results: dict) -> None:
  print(f"\n(a) shakespeare_char, {FLAGS.steps} steps, {os.cpu_count()} cores")
  print(f"{'run':<10}{'whole process s':>17}{'exact val loss':>16}{'time / torch':>14}")
  for run in ("torch", "llmjax", "speedrun"):
    if run in results:
      r, torch = results[run], results.get("torch", {}).get("seconds", math.nan)
      print(f"{run:<10}{r['seconds']:>17.1f}{r['loss']:>16.4f}{r['seconds'] / torch:>14.2f}")
  print(f"\n(b) 10.65M shape (6 x 384, block 256, batch 64), {FLAGS.shape_steps} steps; MFU "
        f"against each framework's own matmul peak at the precision used")
  print(f"{'run':<24}{'tokens/s':>10}{'MFU':>8}")
  for dtype in FLAGS.shape_dtypes:
    for run in (f"torch_shape {dtype}", f"llmjax_shape {dtype}"):
      if run in results:
        r = results[run]
        print(f"{run:<24}{r['tokens_per_s']:>10,.0f}{100 * r['mfu']:>7.1f}%")
  names = ("x@w", "g@wT", "xT@g", "1024^3")
  rows = FLAGS.product_rows or SHAPE["batch"] * SHAPE["block"]
  print(f"\n(c) a projection's products at the 10.65M shape ({rows} x 384 -> 1536), GF/s")
  print(f"{'products':<24}" + "".join(f"{n:>9}" for n in names))
  for dtype in FLAGS.shape_dtypes:
    for framework in ("torch", "xla"):
      if f"products {dtype}" in results:
        r = results[f"products {dtype}"][framework]
        print(f"{framework + ' ' + dtype:<24}" + "".join(f"{r[n]:>9.0f}" for n in names))


if __name__ == "__main__":
  app.run(main)
