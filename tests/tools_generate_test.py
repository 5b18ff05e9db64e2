"""tools/generate.py end to end, as a researcher runs it: from a converted Hugging Face GPT-2
(whose greedy text must be transformers' own), streamed or not. From a training run's workdir:
tests/checkpoint_test.py, which trains one."""

import functools
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = re.compile(r"^--- sample (\d+)/(\d+) ---\n", re.M)


def generate(*arg_lists) -> list[subprocess.CompletedProcess]:
  """Runs tools/generate.py once per argument list, all at the same time."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in arg_lists]
  outs = [p.communicate(timeout=300) for p in procs]
  return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outs)]


def ok(*arg_lists) -> list[str]:
  """The stdout of each run, which must succeed."""
  procs = generate(*arg_lists)
  for proc in procs:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return [proc.stdout for proc in procs]


def samples(stdout: str) -> dict[int, str]:
  """Sample number -> text, from the headed output of several prompts."""
  parts = HEADER.split(stdout)
  assert parts[0] == "", stdout
  return {int(i): text.removesuffix("\n") for i, _, text in zip(*[iter(parts[1:])] * 3)}


@pytest.fixture(scope="module", autouse=True)
def converted(tmp_path_factory):
  """A tiny random GPT-2 with a GPT-2 byte-level BPE tokenizer trained here, converted by
  tools/convert_hf.py. Autouse, so the conversion runs in the background while the workdir's
  run trains; yields a function that waits for it: (out_dir, transformers' tokenizer, model)."""
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  root = tmp_path_factory.mktemp("hf")
  corpus = ["the quick brown fox jumps over the lazy dog", "a ação do coração é a razão",
            "hello, world! isn't it nice? we're here; they've gone.", "numbers 12345 and 3.14"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  theirs = transformers.GPT2TokenizerFast(tokenizer_object=tok)
  torch.manual_seed(0)
  # A wide initialization, so the greedy choices are not near-ties that rounding could flip.
  cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(theirs),
                                n_positions=64, initializer_range=0.2,
                                bos_token_id=theirs.bos_token_id, eos_token_id=theirs.eos_token_id)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  model.save_pretrained(root / "hf", safe_serialization=True)
  theirs.save_pretrained(root / "hf")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"), f"--hf_dir={root / 'hf'}",
       f"--out_dir={root / 'out'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})

  @functools.cache
  def wait():
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return str(root / "out"), theirs, model

  yield wait
  if proc.poll() is None:
    proc.kill()
  proc.communicate()


def test_checkpoint_greedy_text_is_transformers_and_streams_the_same(converted):
  import torch
  out_dir, theirs, model = converted()
  prompt = "the quick brown"
  ids = theirs(prompt)["input_ids"]
  with torch.no_grad():
    full = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=0,
                          do_sample=False, eos_token_id=[], pad_token_id=0)[0].tolist()
  assert len(full) == len(ids) + 8
  want = prompt + theirs.decode(full[len(ids):], skip_special_tokens=True)
  args = (f"--checkpoint={out_dir}", f"--prompt={prompt}", "--max_new_tokens=8", "--noeos")
  assert ok(args, (*args, "--stream")) == [want + "\n"] * 2


@pytest.mark.parametrize("args, message", [
    (("--workdir=/no/such/run", "--prompt=a"), "--workdir=/no/such/run does not exist"),
    (("--checkpoint=.", "--prompt=a", "--num_beams=2", "--stream"), "--stream needs --num_beams=1"),
    (("--workdir=.", "--checkpoint=.", "--prompt=a"), "exactly one of --workdir"),
    (("--checkpoint=.",), "no prompts"),
    (("--checkpoint=.", "--prompts_file={empty}"), "--prompts_file={empty} holds no prompts"),
])
def test_user_mistakes_are_one_line(args, message, tmp_path):
  """Caught before anything loads: one line on stderr, no traceback, a failing exit status."""
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  proc, = generate([a.format(empty=empty) for a in args])
  assert proc.returncode != 0
  assert proc.stderr.startswith("generate.py: ") and proc.stderr.count("\n") == 1, proc.stderr
  assert message.format(empty=empty) in proc.stderr
