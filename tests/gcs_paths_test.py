"""gs:// paths everywhere a path is taken: data sources, tokenizers, Hugging Face checkpoints,
tools/plot.py, tools/sweep.py, tools/convert_hf.py and tools/generate.py, against the `gcs`
emulator. A bad gs:// input (a missing object, a bucket that doesn't exist or can't be
reached) is one line, in seconds."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from etils import epath

from llmjax import checkpoint, data, hf, models, paths
from llmjax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = ["the cat sat on the mat", "a dog ran", "", "the dog sat on a cat", "héllo wörld"]
WORDS = ["[UNK]", "<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def tool_module(name):
  """tools/NAME.py as a module, shared by the test modules of a process (absl flags are
  defined once)."""
  key = f"tools_{name}"
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


def run_tool(name, *args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", name), *args], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def root(gcs):
  """A fresh gs:// prefix of the emulator's bucket."""
  return f"gs://bucket/{uuid.uuid4().hex[:12]}"


def one_line(fn, *args, match, kind=(ValueError, OSError)):
  with pytest.raises(kind) as info:
    fn(*args)
  message = str(info.value)
  assert match in message and "\n" not in message, message
  return message


def hf_tokenizer_json(directory):
  """A word-level tokenizer.json over WORDS (what a converted checkpoint carries)."""
  from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
  tok = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  (epath.Path(directory) / "tokenizer.json").write_text(tok.to_str())


def tiny_gpt2(directory, seed=0):
  """A random 1-layer GPT-2 checkpoint as transformers writes it (config.json,
  model.safetensors), made with numpy alone, with a tokenizer.json."""
  from safetensors.numpy import save
  V, D, F, P = len(WORDS), 8, 32, 16
  rng = np.random.default_rng(seed)
  shapes = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,),
            "h.0.ln_1.weight": (D,), "h.0.ln_1.bias": (D,), "h.0.ln_2.weight": (D,),
            "h.0.ln_2.bias": (D,), "h.0.attn.c_attn.weight": (D, 3 * D),
            "h.0.attn.c_attn.bias": (3 * D,), "h.0.attn.c_proj.weight": (D, D),
            "h.0.attn.c_proj.bias": (D,), "h.0.mlp.c_fc.weight": (D, F), "h.0.mlp.c_fc.bias": (F,),
            "h.0.mlp.c_proj.weight": (F, D), "h.0.mlp.c_proj.bias": (D,)}
  tensors = {f"transformer.{k}": rng.normal(0, 0.5, s).astype(np.float32)
             for k, s in shapes.items()}
  config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V,
            "n_positions": P, "n_embd": D, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.0}
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  (directory / "model.safetensors").write_bytes(save(tensors))
  hf_tokenizer_json(directory)


# Data sources.

def test_text_and_jsonl_sources_read_gs_files_globs_and_lists(root, tmp_path):
  text = "\n".join(LINES) + "\n"
  for name in ("a.txt", "b.txt"):
    epath.Path(f"{root}/corpus/{name}").write_text(text)
    (tmp_path / name).write_text(text)
  jsonl = "".join(json.dumps({"text": line}) + "\n" for line in LINES if line)
  epath.Path(f"{root}/corpus/c.jsonl").write_text(jsonl)
  local = data.TextSource(f"{tmp_path}/*.txt")
  for spec in (f"{root}/corpus/*.txt", f"{root}/corpus/a.txt,{root}/corpus/b.txt",
               f"{root}/*/b.txt,{root}/corpus/a.txt"):
    sources.check_path(spec)
    remote = sources.open_source(spec)
    assert sorted(remote.paths) == [f"{root}/corpus/a.txt", f"{root}/corpus/b.txt"]
    assert [remote[i] for i in range(len(remote))] == [local[i] for i in range(len(local))]
  np.testing.assert_array_equal(remote.sizes, local.sizes)
  copy = pickle.loads(pickle.dumps(remote))  # what a Grain worker process gets
  assert copy[len(copy) - 1] == LINES[-1]
  records = sources.open_source(f"{root}/corpus/c.jsonl")
  assert isinstance(records, data.JsonlSource)
  assert [records[i] for i in range(len(records))] == [line for line in LINES if line]
  split = sources.open_source(f"{root}/corpus/a.txt", split="paragraph")
  assert len(split) == 2


def test_gs_tokenizers_equal_their_local_twins(root, tmp_path):
  corpus = f"{root}/corpus.txt"
  epath.Path(corpus).write_text("\n".join(LINES * 20))
  (tmp_path / "corpus.txt").write_text("\n".join(LINES * 20))
  char = data.load_tokenizer(f"char:{corpus}")
  assert char.fingerprint == data.load_tokenizer(f"char:{tmp_path}/corpus.txt").fingerprint
  with open(textwrap.__file__, encoding="utf-8") as f:  # varied enough for 400 pieces
    spm = data.train_sentencepiece(f.read().splitlines(), f"{root}/tok/spm", vocab_size=400)
  assert spm.spec == f"{root}/tok/spm.model" and epath.Path(f"{root}/tok/spm.vocab").is_file()
  (tmp_path / "spm.model").write_bytes(epath.Path(spm.spec).read_bytes())
  local = data.load_tokenizer(str(tmp_path / "spm.model"))
  assert data.load_tokenizer(spm.spec).fingerprint == local.fingerprint
  assert spm.encode(LINES[0]).tolist() == local.encode(LINES[0]).tolist()
  hf_tokenizer_json(f"{root}/hf")
  hf_tokenizer_json(tmp_path)
  for spec in (f"{root}/hf", f"{root}/hf/tokenizer.json"):
    tok = data.load_tokenizer(spec)
    assert isinstance(tok, data.HFTokenizer) and tok.spec == spec
    assert tok.fingerprint == data.load_tokenizer(str(tmp_path)).fingerprint
    assert tok.encode("the cat ran").tolist() == [2, 3, 9]


def test_bad_gs_data_and_tokenizers_are_one_line(root, monkeypatch):
  epath.Path(f"{root}/a.txt").write_text("text\n")
  one_line(sources.check_path, f"{root}/b.txt", match=f"data.path='{root}/b.txt' does not exist")
  one_line(sources.check_path, f"{root}/a.txt,{root}/*.md", match=f"'{root}/*.md' matches no file")
  one_line(data.TextSource, f"{root}/*.md", match=f"data path '{root}/*.md' matches no file")
  one_line(data.TextSource, root, match="is a directory; give files or a glob")
  one_line(data.TextSource, f"{root}/**/*.txt", match="'**' is not supported on gs://")
  one_line(sources.open_source, f"{root}/shards/x.array_record",
           match=f"ArrayRecord shards cannot be read from {root}/shards/x.array_record: "
                 f"array_record reads local files only; copy them to a local disk first")
  one_line(data.load_tokenizer, f"char:{root}/b.txt", match=f"'{root}/b.txt' does not exist")
  one_line(data.load_tokenizer, f"{root}/spm.model", match="does not exist")
  one_line(data.load_tokenizer, f"{root}/nope.json", match="does not exist")
  one_line(data.load_tokenizer, f"{root}", match=f"'{root}' has no tokenizer.json")
  missing = "gs://no-such-bucket-llmjax/x"
  for fn, arg in [(sources.check_path, f"{missing}/*.txt"), (data.TextSource, f"{missing}/a.txt"),
                  (sources.open_source, f"{missing}/dir"), (data.load_tokenizer, f"char:{missing}"),
                  (data.load_tokenizer, f"{missing}/spm.model"), (data.load_tokenizer, missing),
                  (hf.read_checkpoint, missing)]:
    one_line(fn, arg, match="bucket gs://no-such-bucket-llmjax does not exist")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens there
  one_line(sources.check_path, f"{root}/a.txt", match="cannot be reached")
  one_line(data.load_tokenizer, f"char:{root}/a.txt", match="cannot be reached")


# Hugging Face checkpoints and tools/convert_hf.py, tools/generate.py.

def test_convert_hf_to_gs_loads_back_and_generates(root, tmp_path):
  from jax import tree_util
  tiny_gpt2(tmp_path / "hf")
  tiny_gpt2(f"{root}/hf")
  model, params = hf.load(str(tmp_path / "hf"))
  remote_model, remote_params = hf.load(f"{root}/hf")  # read from gs:// too
  assert remote_model.cfg == model.cfg
  tree_util.tree_map(np.testing.assert_array_equal, remote_params, params)
  convert_hf = tool_module("convert_hf")
  out = f"{root}/converted"
  _, _, copied = convert_hf.convert(f"{root}/hf", out)
  assert copied == ["tokenizer.json"]
  epath.Path(f"{root}/prompts.txt").write_text("the cat\n\na dog\n")
  generate = run_tool("generate.py", f"--checkpoint={out}", f"--prompts_file={root}/prompts.txt",
                      "--max_new_tokens=3", "--noeos")
  loaded, loaded_params = checkpoint.load_model(out)
  assert isinstance(loaded, models.GPT) and loaded.cfg == model.cfg
  tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)
  assert checkpoint.load_tokenizer(out).encode("a dog").tolist() == [7, 8]
  one_line(convert_hf.convert, str(tmp_path / "hf"), out, match="already holds a checkpoint")
  one_line(convert_hf.convert, str(tmp_path / "hf"), "gs://no-such-bucket-llmjax/out",
           match="bucket gs://no-such-bucket-llmjax does not exist")
  one_line(hf.read_checkpoint, f"{root}/nothing", match="no config.json")
  proc = finish(generate)
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = [s.split("\n")[1] for s in proc.stdout.split("--- sample ")[1:]]
  assert len(samples) == 2 and samples[0].startswith("the cat") and samples[1].startswith("a dog")
  assert samples[0] != "the cat"  # a word-level tokenizer without a decoder: "the catdog..."


# tools/plot.py, tools/sweep.py.

def write_run(workdir, steps, records, command=None):
  workdir = epath.Path(workdir)
  (workdir / "config.json").write_text(json.dumps({"train": {"steps": steps}}))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if command is not None:
    (workdir / "sweep_command.json").write_text(json.dumps(command))


def test_plot_reads_gs_workdirs_by_glob_and_writes_to_gs(root):
  for name, scale in [("run_a", 1.0), ("run_b", 0.5)]:
    write_run(f"{root}/sweep/{name}", 20, [{"step": s, "train/loss": scale / (1 + s)}
                                           for s in range(0, 21, 5)] + [{"step": 20,
                                                                         "eval/loss": scale}])
  proc = finish(run_tool("plot.py", f"--out={root}/plots/curves.png",
                         f"--workdirs={root}/sweep/*"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "of 2 workdirs" in proc.stdout
  assert epath.Path(f"{root}/plots/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_reads_skips_and_clears_gs_runs(root):
  sweep = tool_module("sweep")
  bad = run_tool("sweep.py", "--workdir=gs://no-such-bucket-llmjax/sweep", "--grid=seed=1,2")
  runs = sweep.commands(sweep.expand_grid("seed=1,2"), None, f"{root}/sweep")
  assert [r.workdir for r in runs] == [f"{root}/sweep/seed=1", f"{root}/sweep/seed=2"]
  done, stopped = runs
  write_run(done.workdir, 6, [{"step": 0, "eval/loss": 5.0}, {"step": 6, "eval/loss": 4.0}],
            done.argv[1:])
  write_run(stopped.workdir, 6, [{"step": 3, "train/loss": 4.5}], stopped.argv[1:])
  assert sweep.is_finished(done) and not sweep.is_finished(stopped)
  assert sweep.last_values(done.workdir, ["eval/loss"]) == {"eval/loss": 4.0}
  assert "seed=1" in sweep.table(runs, ["eval/loss"])
  sweep.start(done, finished=True)  # --rerun: cleared, then its command recorded anew
  assert not epath.Path(done.workdir, "metrics.jsonl").exists()
  assert json.loads(epath.Path(done.workdir, sweep.COMMAND_FILE).read_text()) == done.argv[1:]
  assert not sweep.is_finished(done)
  proc = finish(bad)
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr.startswith("sweep: ") and "no-such-bucket-llmjax does not exist" in proc.stderr


def test_paths_glob_matches_local_glob_on_gs(root):
  for name in ("a/x.txt", "a/y.txt", "b/x.txt", "b/z.md"):
    epath.Path(f"{root}/{name}").write_text(name)
  assert paths.glob(f"{root}/*/x.txt") == [f"{root}/a/x.txt", f"{root}/b/x.txt"]
  assert paths.glob(f"{root}/b/*") == [f"{root}/b/x.txt", f"{root}/b/z.md"]
  assert paths.glob(f"{root}/a/y.txt") == [f"{root}/a/y.txt"]
  assert paths.glob(f"{root}/a/q.txt") == [] and paths.glob(f"{root}/c/*") == []
