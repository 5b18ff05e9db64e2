"""The training tools as a researcher runs them: a sweep (dry run, a real tiny one, a rerun),
tools/tpu.sh's gcloud commands, and plotted curves."""

import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SETTINGS = ("NAME", "ZONE", "TYPE", "RUNTIME", "PROJECT", "REPO", "CONFIG", "WORKDIR",
                "WORKER", "DRY_RUN")
# A 6-step GPT of 2 layers on 4 x 64 tokens, evaluated at steps 0 and 6 on one batch.
TINY = ["--set=train.steps=6", "--set=train.log_every=3", "--set=train.eval_every=6",
        "--set=train.eval_batches=1", "--set=train.checkpoint_every=1000",
        "--set=train.sample_tokens=0", "--set=model.num_layers=2", "--set=batch_size=4",
        "--set=objective.length=64", "--set=model.max_seq_len=64"]


def load_sweep_module():
  """tools/sweep.py as a module (its absl flags are defined once per process)."""
  if "tools_sweep" not in sys.modules:
    spec = importlib.util.spec_from_file_location("tools_sweep",
                                                  os.path.join(ROOT, "tools", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["tools_sweep"] = module
    spec.loader.exec_module(module)
  return sys.modules["tools_sweep"]


sweep = load_sweep_module()


def run_tool(name, *args):
  """`python tools/NAME ARGS` from the repo root, in a subprocess."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def main_commands(text):
  """The llmjax.main commands in the output, parsed back with shlex."""
  commands = [shlex.split(line) for line in text.splitlines()
              if "llmjax.main" in line and not line.startswith(("#", "["))]
  return [c for c in commands if c[1:3] == ["-m", "llmjax.main"]]


def parse_table(text):
  """The last table in the output: a list of {column: cell} rows."""
  lines = text.splitlines()
  rule = max(i for i, line in enumerate(lines) if re.fullmatch(r"-+( +-+)*", line))
  header = re.split(r" {2,}", lines[rule - 1].strip())
  rows = []
  for line in lines[rule + 1:]:
    if not line.strip():
      break
    rows.append(dict(zip(header, re.split(r" {2,}", line.strip()))))
  return rows


def flag_values(argv):
  """{'--flag': 'value'} of the --flag=value arguments."""
  return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def write_metrics(workdir, records):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


# Sweep: expansion and names.

def test_expand_grid_is_the_cartesian_product_in_order():
  runs = sweep.expand_grid("optimizer.learning_rate=1e-3,3e-3; model.num_layers=2,4")
  assert runs == [{"optimizer.learning_rate": "1e-3", "model.num_layers": "2"},
                  {"optimizer.learning_rate": "1e-3", "model.num_layers": "4"},
                  {"optimizer.learning_rate": "3e-3", "model.num_layers": "2"},
                  {"optimizer.learning_rate": "3e-3", "model.num_layers": "4"}]
  assert sweep.expand_grid("config.mesh.shape=(-1,2,1),(-1,1,2)") == [
      {"mesh.shape": "(-1,2,1)"}, {"mesh.shape": "(-1,1,2)"}]
  for bad in ["a=1;a=2", "learning_rate", "a=1,,2", "=1", "a b=1"]:
    with pytest.raises(ValueError):
      sweep.expand_grid(bad)


def test_run_names_are_distinct_and_safe():
  """Overrides that differ only in characters a path can't hold, or in where a ',' or '='
  falls, still get distinct directory names."""
  overrides = [{}, {"a.b": "1"}, {"a.b": "1/2"}, {"a.b": "1_2"}, {"a.b": "1 2"},
               {"a.b": "(1,2)"}, {"a.b": "(1, 2)"}, {"a.b": "(1,_2)"}, {"x": "1", "y": "2"},
               {"x": "1,y=2"}, {"x": "1=y"}, {"y": "2", "x": "1"}, {"a.b": "x" * 300},
               {"a.b": "x" * 301}, {"optimizer.learning_rate": "0.001", "model.num_layers": "2"}]
  names = [sweep.run_name(o) for o in overrides]
  assert len(set(names)) == len(names), names
  for name in names:
    assert re.fullmatch(r"[A-Za-z0-9._=,+-]+", name) and len(name) <= 130, name
  assert names[-1] == "optimizer.learning_rate=0.001,model.num_layers=2"
  assert sweep.run_name({"a.b": "1/2"}) == names[2]  # a name is a function of the overrides


def test_sweep_file_crossed_with_grid_and_fixed_overrides(tmp_path):
  path = tmp_path / "sweep_file.py"
  path.write_text("def sweep():\n  return [dict(optimizer=dict(learning_rate=1e-3)),\n"
                  "          {'config.optimizer.learning_rate': 3e-3, 'seed': 1}]\n")
  from_file = sweep.load_sweep(str(path))
  assert from_file == [{"optimizer.learning_rate": "0.001"},
                       {"optimizer.learning_rate": "0.003", "seed": "1"}]
  runs = sweep.commands(sweep.combine(from_file, sweep.expand_grid("model.num_layers=2,4")),
                        "experiments/gpt.py:tiny", str(tmp_path), {"train.steps": "6"})
  assert len(runs) == 4 and len({r.workdir for r in runs}) == 4
  flags = flag_values(runs[3].argv)
  assert runs[3].argv[1:3] == ["-m", "llmjax.main"]
  assert flags == {"--config": "experiments/gpt.py:tiny", "--workdir": runs[3].workdir,
                   "--config.train.steps": "6", "--config.optimizer.learning_rate": "0.003",
                   "--config.seed": "1", "--config.model.num_layers": "4"}
  with pytest.raises(ValueError, match="both set model.num_layers"):
    sweep.commands([{"model.num_layers": "2"}], None, "r", {"model.num_layers": "4"})
  with pytest.raises(ValueError, match="twice"):
    sweep.commands([{"seed": "1"}, {"seed": "1"}], None, "r")
  with pytest.raises(ValueError, match="both set"):
    sweep.combine([{"seed": "1"}], [{"seed": "2"}])


def test_finished_means_the_final_step_of_the_config_it_trained_with(tmp_path):
  """`runlocal` shrinks train.steps to 20: a run is finished at the step of its config.json,
  unless the sweep's command for it changed since (then it runs again and resumes)."""
  (run,) = sweep.commands([{"seed": "1"}], None, str(tmp_path),
                          {"train.steps": "500", "runlocal": "True"})
  assert not sweep.is_finished(run)  # nothing there
  write_metrics(run.workdir, [{"step": 0, "eval/loss": 5.0}, {"step": 10, "train/loss": 4.0}])
  with open(os.path.join(run.workdir, "config.json"), "w") as f:
    json.dump({"train": {"steps": 20}}, f)
  assert not sweep.is_finished(run)
  with open(os.path.join(run.workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 20, "train/loss": 3.0, "eval/loss": 3.5}) + "\n")
  assert sweep.is_finished(run)
  assert sweep.last_values(run.workdir, ["eval/loss", "eval/nope"]) == {"eval/loss": 3.5}
  command = os.path.join(run.workdir, sweep.COMMAND_FILE)
  with open(command, "w") as f:
    json.dump(run.argv[1:], f)
  assert sweep.is_finished(run)
  with open(command, "w") as f:
    json.dump(run.argv[1:-1] + ["--config.runlocal=False"], f)
  assert not sweep.is_finished(run)


def test_dry_run_prints_pasteable_commands(tmp_path):
  root = tmp_path / "root dir"  # a space: the printed commands must quote it
  proc = run_tool("sweep.py", "--config=experiments/gpt.py:tiny", f"--workdir={root}",
                  "--grid=optimizer.learning_rate=1e-3,3e-3;model.num_layers=2,4",
                  "--set=train.steps=6", "--set=batch_size=4", "--dry_run")
  assert proc.returncode == 0, proc.stderr[-3000:]
  commands = main_commands(proc.stdout)
  assert len(commands) == 4, proc.stdout
  expected = sweep.expand_grid("optimizer.learning_rate=1e-3,3e-3;model.num_layers=2,4")
  for argv, overrides in zip(commands, expected):
    flags = flag_values(argv)
    assert argv[0] == sys.executable
    assert flags["--config"] == "experiments/gpt.py:tiny"
    assert flags["--workdir"] == os.path.join(str(root), sweep.run_name(overrides))
    assert flags["--config.train.steps"] == "6" and flags["--config.batch_size"] == "4"
    for key, value in overrides.items():
      assert flags[f"--config.{key}"] == value
  assert len({flag_values(c)["--workdir"] for c in commands}) == 4
  assert not root.exists()  # nothing ran


def test_a_tiny_sweep_trains_tabulates_fails_and_skips_on_rerun(tmp_path):
  """Two real runs and one that fails (its data shards don't divide the batch): the table has
  both runs' last eval loss and the failure; the exit status is non-zero; the same sweep again
  skips the finished runs."""
  path = tmp_path / "sweep_file.py"
  path.write_text("def sweep():\n  return [dict(optimizer=dict(learning_rate=1e-3)),\n"
                  "          {'optimizer.learning_rate': 3e-3},\n"
                  "          {'data.shards': 3}]\n")
  root = tmp_path / "root"
  args = ["--config=experiments/gpt.py:tiny", f"--workdir={root}", f"--sweep={path}",
          "--metrics=eval/loss,train/loss", *TINY]
  proc = run_tool("sweep.py", *args)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = {row["run"]: row for row in parse_table(proc.stdout)}
  good = ["optimizer.learning_rate=0.001", "optimizer.learning_rate=0.003"]
  assert set(rows) == set(good) | {"data.shards=3"}, proc.stdout[-3000:]
  lengths = {}
  for name in good:
    with open(root / name / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    trains = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(evals) == 2 and evals[0] != evals[1]  # steps 0 and 6: the last one is reported
    assert rows[name]["eval/loss"] == f"{evals[-1]:.5g}"
    assert rows[name]["train/loss"] == f"{trains[-1]:.5g}"
    assert rows[name]["status"] == "ok"
    with open(root / name / sweep.COMMAND_FILE) as f:
      assert json.load(f)[:2] == ["-m", "llmjax.main"]
    lengths[name] = len(records)
  assert rows["data.shards=3"]["status"] == "failed (exit 1)"
  assert rows["data.shards=3"]["eval/loss"] == "-"
  table = parse_table(proc.stdout)
  assert [float(r["eval/loss"]) for r in table[:2]] == sorted(float(r["eval/loss"])
                                                             for r in table[:2])
  assert table[2]["run"] == "data.shards=3"  # runs without the metric sort last

  proc = run_tool("sweep.py", *args)
  assert proc.returncode == 1
  rows = {row["run"]: row for row in parse_table(proc.stdout)}
  for name in good:
    assert f"# {name}: finished" in proc.stdout
    assert rows[name]["status"] == "done"
    with open(root / name / "metrics.jsonl") as f:
      assert len(f.readlines()) == lengths[name]  # not trained again
  assert rows["data.shards=3"]["status"] == "failed (exit 1)"  # tried again
  proc = run_tool("sweep.py", *args, "--rerun", "--dry_run")
  assert [c for c in proc.stdout.splitlines() if c.startswith("rm -rf")] == [
      shlex.join(["rm", "-rf", "--", str(root / name)]) for name in good]


# tools/tpu.sh

def tpu(*args, **env):
  base = {k: v for k, v in os.environ.items() if k not in TPU_SETTINGS}
  return subprocess.run(["bash", os.path.join(ROOT, "tools", "tpu.sh"), *args],
                        env={**base, **env}, capture_output=True, text=True, timeout=60)


WHERE = ["--name=lm-1", "--zone=us-central2-b", "--type=v4-32",
         "--runtime=tpu-ubuntu2204-base"]


def test_tpu_dry_run_prints_the_gcloud_commands(tmp_path):
  proc = tpu("--dry-run", *WHERE, "--project=my-proj", "create")
  assert proc.returncode == 0, proc.stderr
  assert shlex.split(proc.stdout) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "lm-1", "--zone=us-central2-b",
      "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]

  proc = tpu("install", DRY_RUN="1", NAME="lm-1", ZONE="us-central2-b")
  assert proc.returncode == 0, proc.stderr
  lines = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert lines[0][:2] == ["bash", "-c"] and "tar -czf" in lines[0][2]  # the checkout's tarball
  assert lines[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in lines[1]
  assert lines[2][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm-1"]
  flags = flag_values(lines[2])
  assert flags["--worker"] == "all" and flags["--zone"] == "us-central2-b"
  assert "pip install -q -e . 'jax[tpu]'" in flags["--command"]
  proc = tpu("--dry-run", *WHERE, "--repo=https://example.com/llmjax.git", "install")
  assert len(proc.stdout.splitlines()) == 1
  assert "git clone https://example.com/llmjax.git llmjax" in proc.stdout

  proc = tpu("--dry-run", *WHERE, "--type=v4-8", "--config=experiments/gpt.py:small",
             "--workdir=/mnt/r 1", "launch", "--", "--config.train.steps=20",
             "--config.data.path=it's *.jsonl")  # one host: a local workdir is fine
  assert proc.returncode == 0, proc.stderr
  argv = shlex.split(proc.stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm-1"]
  remote = flag_values(argv)["--command"]
  assert flag_values(argv)["--worker"] == "all"
  words = shlex.split(remote)
  assert words[:10] == ["cd", "llmjax", "&&", "rm", "-f", "~/llmjax.exit", "&&", "nohup",
                        "bash", "-c"] and words[11:13] == [">", "~/llmjax.log"]
  assert shlex.split(words[10]) == [  # the run, then its exit status kept for `status`
      ".venv/bin/python", "-m", "llmjax.main", "--config=experiments/gpt.py:small",
      "--workdir=/mnt/r 1", "--config.train.steps=20", "--config.data.path=it's *.jsonl",
      ";", "echo", "$?", ">", "~/llmjax.exit"]

  for command, expected in [("logs", "--worker=0"), ("delete", "delete")]:
    proc = tpu("--dry-run", *WHERE, command)
    assert proc.returncode == 0 and expected in shlex.split(proc.stdout), proc.stdout

  # Without --dry-run the same argv reaches gcloud (a stand-in that records it).
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  proc = tpu(*WHERE, "delete", "--", "--quiet", PATH=f"{bin_dir}:{os.environ['PATH']}")
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "argv").read_text().splitlines() == [
      "compute", "tpus", "tpu-vm", "delete", "lm-1", "--zone=us-central2-b", "--quiet"]


def test_tpu_status_says_what_each_exit_means(tmp_path):
  """launch's command and status's, run as a worker runs them (in $HOME, with a stand-in
  interpreter that exits as llmjax.main would): the exit status is kept and read back as
  finished, stopped (resumable) or failed with the log's last line; none at all (a kill -9
  or a preemption) also says the same launch resumes; a live run is running."""
  launch = flag_values(shlex.split(tpu("--dry-run", *WHERE, "--type=v4-8", "--workdir=/w",
                                       "--config=experiments/gpt.py:small", "launch").stdout))
  status = flag_values(shlex.split(tpu("--dry-run", *WHERE, "status").stdout))["--command"]
  bin_dir, venv = tmp_path / "bin", tmp_path / "llmjax" / ".venv" / "bin"
  for directory in (bin_dir, venv):
    directory.mkdir(parents=True)
  (bin_dir / "pgrep").write_text("#!/bin/sh\n[ -f \"$HOME/live\" ]\n")  # no real process
  (venv / "python").write_text("#!/bin/sh\necho \"step 9 | loss 2.0\"\n"
                               "echo 'llmjax.main: the disk is full' >&2\nexit $(cat ../code)\n")
  for path in (bin_dir / "pgrep", venv / "python"):
    path.chmod(0o755)
  env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

  def worker(command):
    return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30).stdout.split(": ", 1)[1].strip()

  assert worker(status).startswith("not running and no exit status (never launched, or "
                                   "killed: SIGKILL, a preemption, a reboot); the same launch")
  for code, said in [(0, "finished (exit 0)"),
                     (143, "stopped by SIGTERM after saving its last step (exit 143); the "
                           "same launch resumes it"),
                     (130, "stopped by SIGINT after saving its last step (exit 130); the "
                           "same launch resumes it"),
                     (1, "failed (exit 1): llmjax.main: the disk is full")]:
    (tmp_path / "code").write_text(str(code))
    assert worker(launch["--command"]).startswith("started, log ~/llmjax.log")
    deadline = time.time() + 10
    exit_file = tmp_path / "llmjax.exit"
    while not (exit_file.exists() and exit_file.read_text().strip()) and time.time() < deadline:
      time.sleep(0.02)
    assert worker(status) == said, code
  (tmp_path / "live").touch()
  assert worker(status) == "running"


LAUNCH = ["--name=lm-1", "--zone=us-central2-b", "--config=experiments/gpt.py:small"]
DENIED = ("ERROR: (gcloud.storage.cp) [sa@p.iam.gserviceaccount.com] does not have "
          "storage.objects.create access to the Google Cloud Storage object.")


def fake_gcloud(tmp_path, endpoints="10.0.0.2", denied=""):
  """A bin/ of stand-ins: gcloud records each call in calls.txt, answers describe with
  `endpoints`, fails `storage cp` with `denied` if given, and runs an ssh --command that
  checks the bucket as worker 3 would (curl answers the metadata server's worker number)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  scripts = {
      "gcloud": f"""#!/bin/sh
printf '%s\\n' "$*" >> {tmp_path}/calls.txt
for a; do case $a in --command=*) command=${{a#--command=}} ;; esac; done
case "$*" in
  *" describe "*) echo '{endpoints}' ;;
  "storage cp "*) [ -z '{denied}' ] || {{ echo 'Copying file://x'; echo '{denied}'; }} >&2
                  [ -z '{denied}' ] ;;
  *" ssh "*) case $command in *"gcloud storage"*) exec bash -c "$command" ;; esac ;;
esac
""",
      "curl": "#!/bin/sh\necho 3\n"}
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return f"{bin_dir}:{os.environ['PATH']}"


def calls(tmp_path):
  path = tmp_path / "calls.txt"
  return path.read_text().splitlines() if path.exists() else []


def test_tpu_launch_checks_a_gs_workdir_from_every_worker_first(tmp_path):
  proc = tpu("--dry-run", *LAUNCH, "--type=v4-32", "--workdir=gs://my-bucket/runs/x/",
             "launch", "--", "--config.train.steps=20")
  assert proc.returncode == 0, proc.stderr
  check, launch = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert check[:6] == launch[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm-1"]
  assert flag_values(check)["--worker"] == flag_values(launch)["--worker"] == "all"
  script = flag_values(check)["--command"]
  assert "gcloud storage cp" in script and "gcloud storage rm" in script
  assert "--workdir=gs://my-bucket/runs/x/" in flag_values(launch)["--command"]

  # The check as a worker runs it (worker 3, from the metadata server): it writes an object
  # under the workdir and deletes it, or prints one line naming the bucket and the worker.
  env = {"PATH": fake_gcloud(tmp_path), "HOME": str(tmp_path)}
  worker = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert worker.returncode == 0, worker.stderr
  assert worker.stdout == "worker 3: wrote and deleted gs://my-bucket/runs/x/.tpu.sh-probe-3\n"
  probe = "gs://my-bucket/runs/x/.tpu.sh-probe-3"
  assert [c.split()[:2] + c.split()[-1:] for c in calls(tmp_path)] == [
      ["storage", "cp", probe], ["storage", "rm", probe]]
  env["PATH"] = fake_gcloud(tmp_path, denied=DENIED)
  worker = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert worker.returncode == 1 and worker.stdout == ""
  assert worker.stderr == f"tpu.sh: gs://my-bucket is not writable from worker 3: {DENIED}\n"

  # For real: the check's ssh comes first, and a worker that cannot write stops the launch.
  (tmp_path / "calls.txt").unlink()
  proc = tpu(*LAUNCH, "--type=v4-32", "--workdir=gs://my-bucket/runs/x", "launch",
             PATH=fake_gcloud(tmp_path, denied=DENIED), HOME=str(tmp_path))
  assert proc.returncode == 1
  assert f"tpu.sh: gs://my-bucket is not writable from worker 3: {DENIED}" in proc.stderr
  assert proc.stderr.endswith("tpu.sh: nothing launched: the check that gs://my-bucket is "
                              "writable from every worker failed (see above)\n")
  assert not any("llmjax.main" in c for c in calls(tmp_path))
  (tmp_path / "calls.txt").unlink()
  proc = tpu(*LAUNCH, "--type=v4-32", "--workdir=gs://my-bucket/runs/x", "launch",
             PATH=fake_gcloud(tmp_path), HOME=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  ssh = [c for c in calls(tmp_path) if " ssh " in c]
  assert len(ssh) == 2 and "gcloud storage" in ssh[0] and "llmjax.main" in ssh[1]

  proc = tpu("--dry-run", *LAUNCH, "--workdir=gs:///runs/x", "launch")
  assert proc.returncode == 2 and "names no bucket" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("accelerator", [
    "v2-32", "v3-16", "v4-16", "v4-32", "v5p-16", "v5litepod-16", "v5litepod-256", "v6e-16"])
def test_tpu_refuses_a_local_workdir_on_a_multi_host_slice(accelerator):
  proc = tpu("--dry-run", *LAUNCH, f"--type={accelerator}", "--workdir=/mnt/runs/x", "launch")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == (
      f"tpu.sh: --workdir=/mnt/runs/x is a local path, but {accelerator} is a multi-host "
      "slice: each host would write its checkpoint shards to its own disk and no disk would "
      "hold a whole checkpoint; use --workdir=gs://BUCKET/PATH\n")


@pytest.mark.parametrize("accelerator", [
    "v2-8", "v3-8", "v4-8", "v5p-8", "v5litepod-1", "v5litepod-8", "v6e-4", "v6e-8"])
def test_tpu_allows_a_local_workdir_on_a_single_host_slice(accelerator):
  proc = tpu("--dry-run", *LAUNCH, f"--type={accelerator}", "--workdir=/mnt/runs/x", "launch")
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  (launch,) = [shlex.split(line) for line in proc.stdout.splitlines()]  # no bucket check
  run = shlex.split(flag_values(launch)["--command"])[10]  # nohup bash -c RUN
  assert "--workdir=/mnt/runs/x" in shlex.split(run)


def test_tpu_without_a_type_counts_the_hosts_before_a_local_workdir(tmp_path):
  proc = tpu("--dry-run", *LAUNCH, "--workdir=/mnt/runs/x", "launch")
  assert proc.returncode == 0, proc.stderr
  describe, launch = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lm-1",
                      "--zone=us-central2-b", "--format=value(networkEndpoints[].ipAddress)"]
  assert "llmjax.main" in flag_values(launch)["--command"]
  assert "host count of lm-1 is unknown" in proc.stderr

  proc = tpu(*LAUNCH, "--workdir=/mnt/runs/x", "launch",
             PATH=fake_gcloud(tmp_path, endpoints="10.0.0.2;10.0.0.3"))
  assert proc.returncode == 2
  assert proc.stderr.splitlines()[-1].startswith(
      "tpu.sh: --workdir=/mnt/runs/x is a local path, but lm-1 has 2 hosts: each host")
  assert [c.split()[3] for c in calls(tmp_path)] == ["describe"]
  (tmp_path / "calls.txt").unlink()
  proc = tpu(*LAUNCH, "--workdir=/mnt/runs/x", "launch", PATH=fake_gcloud(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert [c.split()[3] for c in calls(tmp_path)] == ["describe", "ssh"]


@pytest.mark.parametrize("args,missing", [
    (["--zone=z", "--type=v4-8", "--runtime=r", "create"], "NAME"),
    (["--name=n", "--zone=z", "--runtime=r", "create"], "TYPE"),
    (["--name=n", "--zone=z", "--type=v4-8", "create"], "RUNTIME"),
    (["--name=n", "install"], "ZONE"),
    (["--name=n", "--zone=z", "--workdir=/w", "launch"], "CONFIG"),
    (["--name=n", "--zone=z", "--config=c", "launch"], "WORKDIR"),
])
def test_tpu_missing_setting_is_exit_2_naming_it(args, missing):
  proc = tpu("--dry-run", *args)
  assert proc.returncode == 2 and f"missing {missing}" in proc.stderr, proc.stderr
  assert proc.stdout == ""


def test_tpu_bad_usage_is_exit_2():
  for args in [["--dry-run", *WHERE, "reboot"], ["--dry-run", *WHERE, "--nmae=x", "create"],
               ["--dry-run", *WHERE]]:
    proc = tpu(*args)
    assert proc.returncode == 2 and "tpu.sh" in proc.stderr, (args, proc.stderr)


# tools/plot.py

def test_plot_writes_a_png_of_several_workdirs(tmp_path):
  from matplotlib import image
  for name, scale in [("run_a", 1.0), ("run_b", 0.8)]:
    records = [{"step": 0, "eval/loss": 6.0 * scale}]
    for step in range(10, 110, 10):
      records.append({"step": step, "train/loss": scale * 6.0 / (1 + step / 30)})
      if step % 50 == 0:
        records[-1]["eval/loss"] = scale * 6.2 / (1 + step / 30)
    write_metrics(tmp_path / name, records)
  out = tmp_path / "plots" / "curves.png"
  proc = run_tool("plot.py", f"--out={out}", str(tmp_path / "run_a"), str(tmp_path / "run_b"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  pixels = image.imread(str(out))
  assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.shape[2] in (3, 4)
  for color in ["#1f77b4", "#ff7f0e"]:  # matplotlib's first two line colors: a line per workdir
    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert (np.abs(pixels[..., :3] - rgb).max(-1) < 0.05).sum() > 100, color


def test_plot_errors_clearly(tmp_path):
  write_metrics(tmp_path / "run_a", [{"step": 1, "train/loss": 3.0}])
  out = tmp_path / "curves.png"
  proc = run_tool("plot.py", f"--out={out}", "--metrics=train/loss,eval/nope",
                  str(tmp_path / "run_a"))
  assert proc.returncode != 0 and "no workdir has the metric 'eval/nope'" in proc.stderr
  assert "train/loss" in proc.stderr.splitlines()[-1]  # what the workdirs do have
  proc = run_tool("plot.py", f"--out={out}", str(tmp_path / "run_a"), str(tmp_path / "empty"))
  assert proc.returncode != 0 and "empty has no metrics.jsonl" in proc.stderr
  assert not out.exists()
