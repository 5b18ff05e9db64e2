"""Trains an experiment: `python -m llmjax.main --config=EXPERIMENT[:variant] --workdir=DIR`.

    python -m llmjax.main                                   # tiny GPT, built-in corpus, CPU
    python -m llmjax.main --config=experiments/gpt.py:tiny --workdir=/tmp/w \\
        --config.train.steps=500 --config.model.num_layers=2

With no --config it trains a tiny byte-level GPT (llmjax/train/config.py) on the built-in
corpus, then prints a sample. A workdir with checkpoints is resumed from the latest (README.md,
Training). A bad command line is refused in one line, before anything is built. Exit status: 0
when finished; 1 with a one-line error (stderr's last line); 130 / 143 on SIGINT / SIGTERM
(in training after saving the step in flight, so the same command resumes it)."""

if __name__ == "__main__":  # before anything heavy is imported or allocated: see
  from llmjax import allocator as _allocator  # llmjax/allocator.py and llmjax/signals.py
  from llmjax import signals as _signals
  _allocator.tune()
  _signals.install()

import atexit
import os
import re
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train", "config.py")
# No default here: ml_collections would load it, and read sys.argv's overrides, at import;
# parse_flags puts --config=DEFAULT_CONFIG on the command line when none is given.
_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Experiment file[:variant]; default: tiny GPT "
                                          "(llmjax/train/config.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes; default: a new temporary directory.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def sample(setup, params, prompt: str, num_tokens: int, seed: int = 0) -> str | None:
  """Text the trained decoder-only model writes after `prompt`; None for other families."""
  from llmjax import decode
  from llmjax.models.gpt import GPTConfig
  if not isinstance(setup.model.cfg, GPTConfig) or not num_tokens:
    return None
  return decode.sample_text(setup.model, params, setup.tokenizer, prompt, num_tokens, seed=seed)


_CONFIG_FLAG = re.compile(r"--?config(=|$)")
_OVERRIDE_FLAG = re.compile(r"--?(no)?config\.([^=]*)(?:=(.*))?$", re.S)


def _flag_args(args: list[str]) -> list[str]:
  return args[:args.index("--")] if "--" in args else args


def check_command_line(args: list[str]) -> dict[str, str]:
  """Loads the experiment `args` (argv[1:]) name and sets each `--config.KEY=VALUE` as
  ml_collections will, but failing in one line where it would raise a traceback: {KEY: TEXT}."""
  from llmjax.train import config as config_lib
  args = _flag_args(args)
  config_at = next((i for i, a in enumerate(args) if _CONFIG_FLAG.match(a)), None)
  spec = None
  if config_at is not None:
    flag = args[config_at]
    spec = flag.partition("=")[2] if "=" in flag else (args[config_at + 1:] or [""])[0]
  config = config_lib.load_experiment(spec)
  overrides, i = {}, 0
  while i < len(args):
    match, i = _OVERRIDE_FLAG.match(args[i]), i + 1
    if not match:
      continue
    negated, key, value = match.groups()
    flag = f"--{'no' if negated else ''}config.{key}"
    if config_at is not None and i - 1 < config_at:
      raise ValueError(f"{flag} comes before --config={spec}; give --config first")
    try:
      kind = config_lib.field_type(config, key)
    except ValueError as e:
      raise ValueError(f"--config.{e}") from None
    if negated or (value is None and kind is bool):
      if kind is not bool:
        raise ValueError(f"{flag}: {key} is not a bool; give --config.{key}=VALUE")
      value = "false" if negated else "true"
    elif value is None:  # --config.KEY VALUE
      if i == len(args):
        raise ValueError(f"{flag} has no value; give {flag}=VALUE")
      value, i = args[i], i + 1
    try:
      config_lib.override(config, key, value)
    except ValueError as e:
      raise ValueError(f"--config.{e}") from None
    overrides[key] = value
  return overrides


_OVERRIDES = {}  # the command line's --config.KEY=TEXT
# JAX's persistent compilation cache, on by default: a restarted, resumed or repeated run loads
# its programs instead of compiling them again. JAX_COMPILATION_CACHE_DIR=DIR moves it (a
# gs:// path serves a pod), JAX_COMPILATION_CACHE_DIR= turns it off.
COMPILATION_CACHE = "~/.cache/llmjax/compilation_cache"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing after `check_command_line`: a bad command line ends in one line."""
  try:
    args = FLAGS.read_flags_from_files(argv[1:], force_gnu=False)  # --flagfile=F expanded
    if not any(_CONFIG_FLAG.match(a) for a in _flag_args(args)):
      argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
      sys.argv = argv  # ml_collections reads the overrides from sys.argv
      args = [argv[1], *args]
    _OVERRIDES.update(check_command_line(args))
    return FLAGS(argv)
  except (flags.Error, ValueError, OSError) as e:
    raise SystemExit(f"llmjax.main: {e}") from None


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # warnings and errors only: a save alone is ~40 INFO lines
    logging.set_verbosity(logging.WARNING)
    _quiet_library_errors()
  import jax
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # see COMPILATION_CACHE
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()  # Cloud TPU: every worker runs this same command
  from llmjax import train
  config = _CONFIG.value
  if config.runlocal:  # shrunk to a CPU smoke run, the command line's --config. flags set again
    from llmjax.train import config as config_lib
    kept = {k: v for k, v in _OVERRIDES.items() if k != "runlocal"}
    config = config_lib.with_overrides(config_lib.shrink_for_cpu(config), kept)
    print("runlocal: shrunk to a CPU smoke run of the same family, objective and optimizer"
          + (f"; kept {', '.join(f'{k}={v}' for k, v in kept.items())}" if kept else ""))
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="llmjax-")
  try:
    result = train.train(config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, train.CheckpointError) as e:
    _fail(f"llmjax.main: {e}")
  if jax.process_index() == 0:
    summarize(result, workdir)
  if result.stopped:
    sys.stdout.flush()
    sys.exit(_signals.exit_status(result.stopped))


def _fail(message: str):
  """Ends the program with `message` as stderr's last line: exit hooks run first, and no library
  thread winding down (a failed save's writers) can print after it."""
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(1)


def _quiet_library_errors() -> None:
  """Library errors logged without tracebacks (each also reaches us as an exception); storage
  callbacks finding asyncio's loop closed after a failed save print nothing."""
  def one_line(record):
    if record.exc_info and "site-packages" in record.pathname:
      record.exc_info = record.exc_text = None
      record.msg = str(record.msg).splitlines()[0] if str(record.msg) else record.msg
    return True

  logging.get_absl_handler().addFilter(one_line)
  unraisable = sys.unraisablehook

  def unraisablehook(u):  # tensorstore's callbacks, after an asyncio loop closed
    if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"):
      unraisable(u)

  sys.unraisablehook = unraisablehook


def summarize(result, workdir: str) -> None:
  """Where the run stopped, or the whole run's eval loss (from metrics.jsonl) and a sample."""
  from llmjax import metrics
  run = result.setup.config  # as trained: `runlocal` shrinks it
  if result.stopped:
    print(f"\nstopped at step {result.step} of {run.train.steps} ({result.stopped}); the same "
          f"command resumes the run. workdir {workdir}")
    return
  evals = [r for r in metrics.read_metrics(workdir) if "eval/loss" in r]
  if evals:
    a, b = evals[0], evals[-1]
    span = (f"{a['eval/loss']:.3f} -> {b['eval/loss']:.3f} (step {a['step']} -> {b['step']})"
            if len(evals) > 1 else f"{b['eval/loss']:.3f} (step {b['step']})")
    print(f"\neval loss {span}; workdir {workdir}")
  text = sample(result.setup, result.params, run.train.sample_prompt, run.train.sample_tokens)
  if text is not None:
    print(f"\nsample:\n{text}")

if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
