"""Generates text from a training run or a converted checkpoint, all prompts in one batched call.

    python tools/generate.py --workdir=RUN_DIR --prompt="ROMEO:" [--prompt=...] \\
        --max_new_tokens=100 --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0
    python tools/generate.py --checkpoint=CONVERTED_DIR --prompts_file=prompts.txt \\
        --num_beams=4 --length_penalty=1.0

Model and tokenizer come from `llmjax.checkpoint` (a workdir's latest checkpoint, or what
tools/convert_hf.py wrote). A GPT continues [BOS] + the prompt's ids (a Hugging Face tokenizer
adds its own specials instead: none for GPT-2) and prints prompt + continuation; a T5 encodes
prompt + EOS and prints what its decoder writes. Rows stop at the tokenizer's EOS unless --noeos.
Several prompts' samples are each headed `--- sample I/N ---`. --stream (with --num_beams=1)
prints as the model writes: one prompt token by token, several each whole once its row is done.
--workdir, --checkpoint and --prompts_file may be gs:// URLs; an unreachable bucket is one line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from llmjax import paths  # noqa: E402

flags.DEFINE_string("workdir", None, "A training run's workdir: its latest checkpoint.")
flags.DEFINE_string("checkpoint", None, "A model checkpoint dir (tools/convert_hf.py writes one).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line; blank lines skipped.")
flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy; otherwise the sampling temperature.")
flags.DEFINE_integer("top_k", None, "Sample among the k likeliest tokens only.")
flags.DEFINE_float("top_p", None, "Sample within the likeliest tokens of this total probability.")
flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (needs temperature 0).")
flags.DEFINE_float("length_penalty", 1.0, "Beam scores are divided by length ** length_penalty.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("eos", True, "Stop each row at the tokenizer's EOS.")
flags.DEFINE_bool("stream", False, "Print tokens as they are produced.")
FLAGS = flags.FLAGS


def _fail(message):
  raise SystemExit("generate.py: " + " ".join(str(message).splitlines()))


def _prompts() -> list[str]:
  """The prompts of --prompt or --prompts_file (not both)."""
  if FLAGS.prompt and FLAGS.prompts_file:
    _fail("give --prompt or --prompts_file, not both")
  if not FLAGS.prompts_file:
    return FLAGS.prompt or _fail("no prompts: give --prompt=TEXT (repeatable) or --prompts_file")
  try:
    paths.check_bucket(FLAGS.prompts_file)
    text = paths.path(FLAGS.prompts_file).read_bytes().decode("utf-8")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as open() reads
    prompts = [line for line in lines if line.strip()]
  except (OSError, UnicodeDecodeError, ValueError) as e:
    _fail(f"cannot read --prompts_file={FLAGS.prompts_file}: {getattr(e, 'strerror', 0) or e}")
  return prompts or _fail(f"--prompts_file={FLAGS.prompts_file} holds no prompts")


def _encode(is_gpt: bool, tokenizer, text: str) -> list[int]:
  """A GPT's prompt or a T5's encoder input, as the models were trained on them."""
  from llmjax.data import HFTokenizer
  ids = tokenizer.encode(text).tolist()
  if not is_gpt:  # HF T5 tokenizers append </s> themselves; llmjax ones do not
    eos = tokenizer.eos_id
    return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids
  bos = None if isinstance(tokenizer, HFTokenizer) else tokenizer.bos_id  # HF adds its own
  return ([bos] if bos is not None else []) + ids


def _write(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def _header(b: int, n: int) -> str:
  return f"--- sample {b + 1}/{n} ---\n" if n > 1 else ""


class _Printer:
  """generate's stream callback: one row token by token, several rows each whole once done."""

  def __init__(self, tokenizer, heads: list[str], eos_id, max_new_tokens: int):
    self.tokenizer, self.heads, self.eos_id, self.last = tokenizer, heads, eos_id, max_new_tokens
    self.new, self.done, self.steps, self.shown = [[] for _ in heads], [False] * len(heads), 0, ""

  def __call__(self, tokens_B) -> None:
    self.steps, n = self.steps + 1, len(self.heads)
    for b, token in enumerate(tokens_B.tolist()):
      if not self.done[b]:
        self.done[b] = token == self.eos_id or self.steps == self.last
        self.new[b] += [] if token == self.eos_id else [token]
        if self.done[b] and n > 1:
          _write(_header(b, n) + self.heads[b] + self.tokenizer.decode(self.new[b]) + "\n")
    text = self.heads[0] + self.tokenizer.decode(self.new[0])
    if n == 1 and text.startswith(self.shown) and not text.endswith("\ufffd"):  # half a char
      _write(text[len(self.shown):])
      self.shown = text

  def finish(self, texts: list[str]) -> None:
    """Writes the rest of the final texts (again in full, one the stream showed differently)."""
    if len(texts) == 1:
      rest = texts[0][len(self.shown):] if texts[0].startswith(self.shown) else "\n" + texts[0]
      return _write(rest + "\n")
    for b, text in enumerate(texts):
      if not self.done[b]:
        _write(_header(b, len(texts)) + text + "\n")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    _fail("give exactly one of --workdir=RUN_DIR or --checkpoint=CONVERTED_DIR")
  if FLAGS.stream and FLAGS.num_beams > 1:
    _fail(f"--stream needs --num_beams=1 (got {FLAGS.num_beams}): beams are known at the end")
  flag, path = ("workdir", FLAGS.workdir) if FLAGS.workdir else ("checkpoint", FLAGS.checkpoint)
  try:
    paths.check_bucket(path)  # before the slow imports, as the checks below
  except ValueError as e:
    _fail(f"--{flag}: {e}")
  where = paths.path(path)
  if not where.is_dir():
    _fail(f"--{flag}={path} {'is not a directory' if where.exists() else 'does not exist'}")
  prompts = _prompts()
  logging.set_verbosity(logging.WARNING)  # not Orbax's INFO lines about reading a checkpoint
  import jax
  from llmjax import checkpoint, decode
  from llmjax.models import GPT, T5
  try:
    model, params = checkpoint.load_model(path)
    if not isinstance(model, (GPT, T5)):
      _fail(f"--{flag}={path} holds a {type(model).__name__}, which does not generate text; "
            f"use llmjax.decode.fill_mask or embed")
    tokenizer = checkpoint.load_tokenizer(path)
    is_gpt = isinstance(model, GPT)
    rows = [_encode(is_gpt, tokenizer, p) for p in prompts]
    eos_id = tokenizer.eos_id if FLAGS.eos else None
    heads = prompts if is_gpt else [""] * len(prompts)
    printer = _Printer(tokenizer, heads, eos_id, FLAGS.max_new_tokens) if FLAGS.stream else None
    new_BN = jax.device_get(decode.generate(
        model, params, rows, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, num_beams=FLAGS.num_beams,
        length_penalty=FLAGS.length_penalty, eos_id=eos_id, pad_id=tokenizer.pad_id or 0,
        rng=jax.random.key(FLAGS.seed), stream=printer))
  except (ValueError, OSError) as e:
    _fail(str(e).removeprefix("generate: "))
  news = [new[:new.index(eos_id)] if eos_id in new else new for new in new_BN.tolist()]
  texts = [head + tokenizer.decode(new) for head, new in zip(heads, news)]
  if printer is not None:
    return printer.finish(texts)
  for b, text in enumerate(texts):
    _write(_header(b, len(texts)) + text + "\n")


if __name__ == "__main__":
  app.run(main)
