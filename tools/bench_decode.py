"""Generation speed of llmjax.decode.generate beside transformers' generate, on the same weights.

    python tools/bench_decode.py                        # tiny + GPT-2-small shapes, batch 1 and 8
    python tools/bench_decode.py --models=tiny --batches=1 --prompt_len=16 --new_tokens=16 \
        --repeats=1 --flat_lengths=16,32 --skip_torch  # seconds, no torch

Each model is a random GPT-2 built in torch (seed 0), saved as safetensors and read with
hf.load, so both frameworks hold the same weights; the tool checks that their greedy tokens
agree. Prefill time is a whole generate call with max_new_tokens=1; decode time is the call
with --new_tokens less that one, spread over the new_tokens - 1 tokens made after prefill.
Times are the best of --repeats calls after a warm-up call (jax: the compilation, reported
apart), each ended by block_until_ready. Greedy, no EOS: every row makes every token.
transformers runs as its users run it: eval(), torch.inference_mode(), use_cache=True,
torch.set_num_threads(os.cpu_count()), float32 (more dtypes: --torch_dtypes).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import linen as nn

from llmjax import decode, hf
from llmjax.models.gpt import GPT, GPTConfig

flags.DEFINE_list("models", ["tiny", "small"], "GPTConfig sizes (tiny gets 1024 positions).")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (best is reported).")
flags.DEFINE_bool("skip_torch", False, "llmjax only (random llmjax weights).")
flags.DEFINE_list("flat_lengths", ["64", "128", "256", "512"],
                  "New-token counts for the ms/token flatness row (batch 1).")
flags.DEFINE_list("torch_dtypes", ["float32"], "transformers dtypes (float32, bfloat16).")
FLAGS = flags.FLAGS


def config(size: str) -> GPTConfig:
  """The benchmarked shape: GPTConfig's preset of that name with 1024 positions (tiny: width
  64, 2 layers, 256 tokens; small: GPT-2 small with its 50257 tokens)."""
  return GPTConfig.from_size(size, max_seq_len=1024, dropout_rate=0.0)


def same_weights(cfg: GPTConfig, tmp: str):
  """(transformers GPT2LMHeadModel, llmjax model, params) holding the same random weights."""
  import torch
  import transformers
  hf_cfg = transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, activation_function="gelu_new",
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  torch_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
  torch_model.save_pretrained(tmp, safe_serialization=True)
  gen = torch_model.generation_config
  gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = None, 0, None
  model, params = hf.load(tmp, dropout_rate=0.0)
  return torch_model, model, params


def random_weights(cfg: GPTConfig):
  """(llmjax model, params): N(0, 0.02) weights, unit norm scales; numpy, so nothing compiles."""
  model, rng = GPT(cfg), np.random.default_rng(0)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        np.zeros((1, 8), np.int32))["params"])
  fill = lambda path, s: (np.ones(s.shape, s.dtype) if path[-1].key == "scale"
                          else (0.02 * rng.standard_normal(s.shape)).astype(s.dtype))
  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def best_time(call, repeats: int) -> tuple[float, float]:
  """(best seconds of `repeats` calls, seconds of the warm-up call before them)."""
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return min(times[1:]), times[0]


def jax_timer(model, params):
  def run(prompts_BP, n):
    return lambda: jax.block_until_ready(decode.generate(model, params, prompts_BP, n))
  return run


def torch_timer(torch_model, dtype: str):
  import copy
  import torch
  torch_model = copy.deepcopy(torch_model).to(getattr(torch, dtype))

  def run(prompts_BP, n):
    ids = torch.as_tensor(prompts_BP, dtype=torch.long)

    def call():
      with torch.inference_mode():
        return torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, num_beams=1,
                                    use_cache=True)
    return call
  return run


def rates(run, B: int, P: int, N: int, repeats: int, rng) -> dict[str, float]:
  """Prefill and decode tokens/s, decode ms per step, and the compile (warm-up) overhead."""
  prompts_BP = rng.integers(1, 200, (B, P)).astype(np.int32)
  prefill, first_prefill = best_time(run(prompts_BP, 1), repeats)
  total, first_total = best_time(run(prompts_BP, N), repeats)
  decode_s = max(total - prefill, 1e-9)
  return {"prefill": B * P / prefill, "decode": B * (N - 1) / decode_s,
          "ms_step": decode_s / (N - 1) * 1e3,
          "compile": first_prefill - prefill + first_total - total}


def agree(torch_model, model, params) -> bool:
  """Whether both frameworks' greedy tokens agree on a short prompt."""
  import torch
  prompt = [[5, 17, 33, 8, 120, 91, 2, 64]]
  ours = np.asarray(decode.generate(model, params, prompt, 24))
  with torch.inference_mode():
    theirs = torch_model.generate(torch.tensor(prompt), max_new_tokens=24, min_new_tokens=24,
                                  do_sample=False, num_beams=1, use_cache=True).numpy()
  return bool(np.array_equal(ours, theirs[:, len(prompt[0]):]))


def main(argv):
  del argv
  P, N, R = FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats
  batches = [int(b) for b in FLAGS.batches]
  use_torch = not FLAGS.skip_torch
  if use_torch:
    try:
      import torch
      import transformers
      torch.set_num_threads(os.cpu_count())
    except ImportError as e:
      print(f"transformers comparison skipped: {e}")
      use_torch = False
  print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); prompt {P}, "
        f"{N} new tokens, greedy, best of {R} after a warm-up")
  if use_torch:
    print(f"transformers {transformers.__version__} / torch {torch.__version__}: "
          f"{torch.get_num_threads()} threads, eval, inference_mode, use_cache, "
          f"dtypes {','.join(FLAGS.torch_dtypes)}")
  rng = np.random.default_rng(0)
  results, flat, notes = {}, {}, []
  for size in FLAGS.models:
    cfg = config(size)
    with tempfile.TemporaryDirectory() as tmp:
      if use_torch:
        torch_model, model, params = same_weights(cfg, tmp)
        notes.append(f"{size}: llmjax and transformers greedy tokens agree: "
                     f"{agree(torch_model, model, params)}")
      else:
        model, params = random_weights(cfg)
    frameworks = {"llmjax": jax_timer(model, params)}
    if use_torch:
      for dtype in FLAGS.torch_dtypes:
        frameworks[f"transformers {dtype}"] = torch_timer(torch_model, dtype)
    for B in batches:
      for name, run in frameworks.items():
        results[size, B, name] = rates(run, B, P, N, R, rng)
    flat[size] = {n: rates(frameworks["llmjax"], 1, P, int(n), R, rng)["ms_step"]
                  for n in FLAGS.flat_lengths}

  print(f"\n{'model':<6} {'batch':>5} {'framework':<22} {'prefill tok/s':>14} "
        f"{'decode tok/s':>13} {'decode ms/step':>15} {'jax compile s':>14}")
  for (size, B, name), r in results.items():
    compile_s = f"{r['compile']:14.1f}" if name == "llmjax" else f"{'-':>14}"
    print(f"{size:<6} {B:>5} {name:<22} {r['prefill']:14,.0f} {r['decode']:13,.0f} "
          f"{r['ms_step']:15.2f} {compile_s}")
  print()
  for size, ms in flat.items():
    spread = max(ms.values()) / min(ms.values())
    print(f"{size} llmjax decode ms/token at batch 1 by new tokens: "
          + ", ".join(f"{n}: {v:.2f}" for n, v in ms.items())
          + f"  (max/min {spread:.2f}x; target <= 1.5x)")
  for size in FLAGS.models:
    one, many = (results.get((size, b, "llmjax")) for b in (1, max(batches)))
    if one and many and max(batches) > 1:
      print(f"{size} llmjax decode tok/s batch {max(batches)} / batch 1: "
            f"{many['decode'] / one['decode']:.2f}x (target >= 4x on tiny)")
    theirs = results.get((size, max(batches), "transformers float32"))
    if theirs:
      ours = results[size, max(batches), "llmjax"]
      print(f"{size} batch {max(batches)} decode tok/s llmjax / transformers float32: "
            f"{ours['decode'] / theirs['decode']:.2f}x (target >= 1 on small)")
  for note in notes:
    print(note)


if __name__ == "__main__":
  app.run(main)
