"""Runs a sweep of one experiment locally, one run after another, and tabulates final metrics.

    python tools/sweep.py --config=experiments/gpt.py:tiny --workdir=/tmp/sweep \\
        --grid='optimizer.learning_rate=1e-3,3e-3;model.num_layers=2,4' \\
        --set=train.steps=500 --metrics=eval/loss,train/loss [--dry_run] [--rerun]
    python tools/sweep.py --config=experiments/gpt.py:tiny --workdir=gs://BUCKET/sweep ...

`--grid` is the cartesian product of axes separated by ';', each `KEY=V1,V2,...` (a comma
inside (), [] or {} belongs to the value: `mesh.shape=(-1,2,1),(-1,1,2)`). `--sweep=FILE.py`
names a file whose `def sweep()` returns a list of override dicts, flat
(`{"optimizer.learning_rate": 1e-3}`) or nested (`dict(optimizer=dict(learning_rate=1e-3))`);
with both, every sweep entry is crossed with every grid point. `--set=KEY=VALUE` (repeated)
goes to every run. Keys are config paths; each becomes `--config.KEY=VALUE` of llmjax.main.
Before any run starts, each run's overrides are set on the experiment's config and its ranges
checked, as llmjax.main would: a missing experiment, a bad variant, a misspelled key (the
nearest valid one is named) or a value its field can't hold ends the sweep with one line.

Each run trains in WORKDIR/NAME, where NAME spells the run's own overrides
(`optimizer.learning_rate=0.001,model.num_layers=2`; characters unsafe in a path become '_'
and a hash of the exact overrides is appended, so distinct overrides get distinct dirs).
A run whose metrics.jsonl reaches its final step (train.steps in the config.json it wrote)
under the same command is skipped; `--rerun` deletes its workdir and trains it again. A run
stopped early (Ctrl-C stops the sweep once the current run has saved a checkpoint; a run
that exits 130 or 143, stopped by SIGINT / SIGTERM with its step saved, is "stopped early",
not failed) resumes next time, as does a finished run whose command changed (e.g. a larger train.steps). A failed
run is reported and the sweep goes on; the exit status is 1 if any run failed. The table,
sorted by the first metric (ascending), gives each run's overrides and the last value of each
metric in its metrics.jsonl. WORKDIR may be a gs:// URL (every file goes through
llmjax.paths); a bucket that can't be reached or written ends the sweep in one line before
any run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys

from absl import app, flags
from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmjax import paths  # noqa: E402

flags.DEFINE_string("config", None, "EXPERIMENT[:variant], passed to llmjax.main.")
flags.DEFINE_string("workdir", None, "Sweep root: each run writes WORKDIR/NAME.", required=True)
flags.DEFINE_multi_string("grid", [], "Axes 'KEY=V1,V2;KEY2=V3,V4' (repeatable): their product.")
flags.DEFINE_string("sweep", None, "Python file whose sweep() returns a list of override dicts.")
flags.DEFINE_multi_string("set", [], "KEY=VALUE override for every run (repeatable).")
flags.DEFINE_list("metrics", ["eval/loss", "train/loss"], "Table columns; sorted by the first.")
flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
flags.DEFINE_bool("rerun", False, "Delete finished runs' workdirs and train them again.")
FLAGS = flags.FLAGS

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")  # in values; keys are dotted names
_MAX_NAME = 120
COMMAND_FILE = "sweep_command.json"  # in each run's workdir: the llmjax.main arguments it got


@dataclasses.dataclass
class Run:
  """One run of the sweep: its own overrides, its workdir and the command that trains it."""
  name: str
  overrides: dict[str, str]
  workdir: str
  argv: list[str]
  status: str = "not run"


def _key(key: str) -> str:
  key = key.strip()
  key = key[len("--config."):] if key.startswith("--config.") else key
  key = key[len("config."):] if key.startswith("config.") else key
  if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
    raise ValueError(f"bad config key {key!r}; expected a path such as optimizer.learning_rate")
  return key


def _split_values(text: str) -> list[str]:
  """'1e-3,(1,2),x' -> ['1e-3', '(1,2)', 'x']: commas inside brackets stay in the value."""
  values, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      values.append(text[start:i])
      start = i + 1
  values.append(text[start:])
  return [v.strip() for v in values]


def parse_override(text: str) -> tuple[str, str]:
  """'KEY=VALUE' -> (KEY, VALUE)."""
  key, eq, value = text.partition("=")
  if not eq:
    raise ValueError(f"expected KEY=VALUE, got {text!r}")
  return _key(key), value.strip()


def expand_grid(spec: str) -> list[dict[str, str]]:
  """'a=1,2;b=x,y' -> [{a:1,b:x}, {a:1,b:y}, {a:2,b:x}, {a:2,b:y}] (the last axis fastest)."""
  axes = []
  for axis in filter(str.strip, spec.split(";")):
    key, values = parse_override(axis)
    values = _split_values(values)
    if not all(values):
      raise ValueError(f"grid axis {axis.strip()!r} has an empty value")
    if key in dict(axes):
      raise ValueError(f"grid axis {key} is given twice")
    axes.append((key, values))
  return [dict(zip([k for k, _ in axes], point))
          for point in itertools.product(*[v for _, v in axes])]


def _flatten(overrides: dict, prefix: str = "") -> dict[str, str]:
  out = {}
  for key, value in overrides.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[_key(f"{prefix}{key}")] = str(value)
  return out


def load_sweep(path: str) -> list[dict[str, str]]:
  """The override dicts that `sweep()` in the Python file `path` returns, keys flattened."""
  spec = importlib.util.spec_from_file_location("_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"{path} defines no sweep() function")
  runs = module.sweep()
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs):
    raise ValueError(f"sweep() in {path} must return a list of dicts")
  return [_flatten(r) for r in runs]


def combine(sweep_runs: list[dict] | None, grid_runs: list[dict] | None) -> list[dict]:
  """Every sweep entry crossed with every grid point (either alone when the other is None)."""
  out = []
  for a, b in itertools.product(sweep_runs or [{}], grid_runs or [{}]):
    if set(a) & set(b):
      raise ValueError(f"--sweep and --grid both set {', '.join(sorted(set(a) & set(b)))}")
    out.append({**a, **b})
  return out


def run_name(overrides: dict[str, str]) -> str:
  """A directory name that spells the overrides; distinct overrides give distinct names."""
  if not overrides:
    return "base"
  values = [_SAFE.sub("_", str(v)) for v in overrides.values()]
  name = ",".join(f"{k}={v}" for k, v in zip(overrides, values))
  if values != [str(v) for v in overrides.values()] or len(name) > _MAX_NAME:
    exact = json.dumps([[k, str(v)] for k, v in overrides.items()])
    name = f"{name[:_MAX_NAME]}-{hashlib.sha1(exact.encode()).hexdigest()[:8]}"
  return name


def commands(runs: list[dict[str, str]], config: str | None, root: str,
             fixed: dict[str, str] | None = None) -> list[Run]:
  """A Run (name, workdir, llmjax.main argv) for each override dict; `fixed` goes to every run."""
  fixed = fixed or {}
  out, names = [], set()
  for overrides in runs:
    both = set(overrides) & set(fixed)
    if both:
      raise ValueError(f"--set and the sweep both set {', '.join(sorted(both))}")
    name = run_name(overrides)
    if name in names:
      raise ValueError(f"the sweep holds the run {name} twice")
    names.add(name)
    workdir = str(epath.Path(root) / name)
    argv = [sys.executable, "-m", "llmjax.main"] + ([f"--config={config}"] if config else [])
    argv += [f"--workdir={workdir}"]
    argv += [f"--config.{k}={v}" for k, v in {**fixed, **overrides}.items()]
    out.append(Run(name, dict(overrides), workdir, argv))
  return out


def _records(workdir: str) -> list[dict]:
  from llmjax.metrics import read_metrics
  return read_metrics(workdir)  # none while metrics.jsonl does not exist


def final_step(run: Run) -> int | None:
  """train.steps as the run trained (its config.json: `runlocal` may have shrunk it); None when
  unknown or when the sweep's command for it changed since (train.steps=N may have grown)."""
  workdir = paths.path(run.workdir)
  try:
    if json.loads((workdir / COMMAND_FILE).read_text()) != run.argv[1:]:
      return None
  except FileNotFoundError:
    pass  # trained outside the sweep
  except (OSError, ValueError):
    return None
  try:
    return int(json.loads((workdir / "config.json").read_text())["train"]["steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def is_finished(run: Run) -> bool:
  """Whether the run's metrics.jsonl holds its final step."""
  steps = final_step(run)
  return steps is not None and any(r.get("step", -1) >= steps for r in _records(run.workdir))


def last_values(workdir: str, metrics: list[str]) -> dict[str, float]:
  """The last value of each metric in workdir/metrics.jsonl (metrics it lacks are left out)."""
  out = {}
  for record in _records(workdir):
    out.update({m: record[m] for m in metrics if m in record})
  return out


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.5g}"


def table(runs: list[Run], metrics: list[str]) -> str:
  """One row per run: its overrides, the last value of each metric, its status and name."""
  keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
  rows = []
  for run in runs:
    values = last_values(run.workdir, metrics)
    first = values.get(metrics[0]) if metrics else None
    missing = first is None or math.isnan(first)
    rows.append(((missing, first if not missing else 0.0),
                 [run.overrides.get(k, "-") for k in keys]
                 + [_fmt(values.get(m)) for m in metrics] + [run.status, run.name]))
  rows = [cells for _, cells in sorted(rows, key=lambda row: row[0])]
  header = keys + metrics + ["status", "run"]
  widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
  lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
           for line in [header, ["-" * w for w in widths]] + rows]
  return "\n".join(lines)


def start(run: Run, finished: bool) -> None:
  """Deletes a finished run's workdir (--rerun) and records the command it trains with."""
  workdir = paths.path(run.workdir)
  if finished:
    workdir.rmtree()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / COMMAND_FILE).write_text(json.dumps(run.argv[1:]))


def execute(run: Run) -> int:
  """Trains the run in a child process; returns its exit status."""
  proc = subprocess.Popen(run.argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # in order
  try:
    return proc.wait()
  except KeyboardInterrupt:
    proc.send_signal(signal.SIGTERM)  # in case the SIGINT was ours alone: it saves and stops
    proc.wait()
    raise


def check_runs(runs: list[Run], config: str | None, fixed: dict[str, str] | None = None,
               origins: dict[str, str] | None = None) -> None:
  """Raises ValueError before any run starts: for an experiment `config` that doesn't load
  (a missing file, a bad variant), a key it lacks (naming the nearest), a value its field
  can't hold, or a run whose config is out of range (what llmjax.main would refuse).
  `origins` names where each key came from (--grid, the --sweep file); --set is `fixed`'s."""
  from llmjax.train import config as config_lib
  base = config_lib.load_experiment(config)
  origins = {**(origins or {}), **{k: "--set" for k in fixed or {}}}
  for run in runs:
    c = copy.deepcopy(base)
    for key, value in {**(fixed or {}), **run.overrides}.items():
      try:
        config_lib.override(c, key, value)
      except ValueError as e:
        raise ValueError(f"{origins.get(key, 'override')}: {e}") from None
    try:
      config_lib.validate(config_lib.shrink_for_cpu(c) if c.runlocal else c)
    except ValueError as e:
      raise ValueError(f"run {run.name}: {e}") from None


def sweep_runs() -> list[Run]:
  """The runs that the flags describe, each checked against the experiment's config."""
  if not FLAGS.grid and not FLAGS.sweep:
    raise ValueError("give --grid and/or --sweep")
  grid = expand_grid(";".join(FLAGS.grid)) if FLAGS.grid else None
  from_file = load_sweep(FLAGS.sweep) if FLAGS.sweep else None
  fixed = dict(parse_override(s) for s in FLAGS.set)
  runs = commands(combine(from_file, grid), FLAGS.config, FLAGS.workdir, fixed)
  origins = {k: FLAGS.sweep for r in from_file or [] for k in r}
  origins.update({k: "--grid" for r in grid or [] for k in r})
  check_runs(runs, FLAGS.config, fixed, origins)
  return runs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    paths.check_bucket(FLAGS.workdir)
    runs = sweep_runs()
    if not FLAGS.dry_run:  # a dry run writes nothing
      paths.open_dir(FLAGS.workdir, "--workdir")
  except (OSError, ValueError, SyntaxError) as e:
    raise SystemExit(f"sweep: {e}") from None
  failed, interrupted = 0, False
  try:
    for i, run in enumerate(runs, 1):
      finished = is_finished(run)
      if finished and not FLAGS.rerun:
        run.status = "done"
        print(f"# {run.name}: finished; --rerun to train it again", flush=True)
        continue
      if FLAGS.dry_run:
        if finished:
          remove = ["gcloud", "storage", "rm", "-r"] if paths.is_url(run.workdir) else ["rm", "-rf"]
          print(shlex.join([*remove, "--", run.workdir]))
        print(shlex.join(run.argv), flush=True)
        continue
      print(f"\n[{i}/{len(runs)}] {shlex.join(run.argv)}", flush=True)
      start(run, finished)
      run.status = "interrupted"  # until it returns
      code = execute(run)
      if code in (130, 143):  # llmjax.main stopped by SIGINT / SIGTERM, step saved
        run.status = "stopped early"
      elif code:
        run.status = f"failed (exit {code})" if code > 0 else f"failed (signal {-code})"
      else:
        run.status = "ok" if is_finished(run) else "stopped early"
      failed += run.status != "ok"
  except KeyboardInterrupt:
    interrupted = True
  print("\n" + table(runs, FLAGS.metrics))
  if interrupted:
    print("\nsweep: interrupted")
  elif failed:
    print(f"\nsweep: {failed} of {len(runs)} runs failed or stopped early")
  return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
