"""The workdir's lease: one run holds it, a second is refused in one line, a stale one is
taken over, a lost one is noticed; locally and on gs:// (the emulator's generations)."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import jax
import pytest
from jax.experimental import multihost_utils

from llmjax import paths
from llmjax.train import lease

HOST, PID = socket.gethostname(), os.getpid()


@pytest.fixture(params=["local", "gs"])
def run_dir(request, tmp_path):
  if request.param == "local":
    return paths.path(tmp_path)
  request.getfixturevalue("gcs")
  return paths.path(f"gs://bucket/lease-{uuid.uuid4().hex}")


def _plant(run_dir, **holder):
  """A lease.json of another run, written unconditionally."""
  holder = {"host": "elsewhere", "pid": 7, "started": time.time() - 600,
            "heartbeat": time.time(), "run": "theirs", **holder}
  (run_dir / "lease.json").write_text(json.dumps(holder))


def _holder(run_dir):
  return json.loads((run_dir / "lease.json").read_text())


def test_second_run_refused_then_reacquired(run_dir):
  with lease.hold(run_dir) as held:
    assert _holder(run_dir)["run"] == held.me["run"]
    with pytest.raises(ValueError) as e:
      lease.Lease(run_dir).acquire()
    assert re.fullmatch(
      f"workdir {re.escape(str(run_dir))} is in use by host {re.escape(HOST)} pid {PID} \\(heartbeat "
      r"\d s ago, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); stop that run, or wait 120 s after "
      r"it died, or use another --workdir", str(e.value))
  assert not (run_dir / "lease.json").exists()
  with pytest.raises(RuntimeError), lease.hold(run_dir):  # released on an exception too
    raise RuntimeError
  with lease.hold(run_dir) as again:
    assert _holder(run_dir)["run"] == again.me["run"]


def test_stale_lease_taken_over(run_dir):
  _plant(run_dir, heartbeat=time.time() - 300)
  lines = []
  with lease.hold(run_dir, log=lines.append) as held:
    assert _holder(run_dir)["run"] == held.me["run"]
  assert lines == ["took over the stale lease of elsewhere:7 (last heartbeat 300 s ago)"] or lines == [
    "took over the stale lease of elsewhere:7 (last heartbeat 301 s ago)"]


def test_fresh_lease_of_other_host_refused(run_dir):
  _plant(run_dir, heartbeat=time.time() - 30)
  with pytest.raises(ValueError, match=r"in use by host elsewhere pid 7 \(heartbeat 3[01] s ago"):
    lease.Lease(run_dir).acquire()
  assert _holder(run_dir)["run"] == "theirs"


def test_dead_process_on_this_host_taken_over_at_once(tmp_path):
  run_dir = paths.path(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", ""])
  proc.wait()
  _plant(run_dir, host=HOST, pid=proc.pid, pidns=lease._pidns())
  lines = []
  with lease.hold(run_dir, log=lines.append):
    pass
  assert lines == [f"took over the stale lease of {HOST}:{proc.pid} (last heartbeat 0 s ago)"]
  _plant(run_dir, host=HOST, pid=PID, pidns=lease._pidns())  # alive: refused
  with pytest.raises(ValueError, match=f"in use by host {HOST} pid {PID}"):
    lease.Lease(run_dir).acquire()


def test_lost_lease_noticed_by_the_heartbeat(run_dir):
  lines = []
  with lease.hold(run_dir, log=lines.append, heartbeat_secs=0.02) as held:
    held.check()
    _plant(run_dir)  # another run took it over while this one's heartbeat lapsed
    deadline = time.time() + 10
    while not held.lost and time.time() < deadline:
      time.sleep(0.01)
    with pytest.raises(ValueError) as e:
      held.check()
  assert str(e.value).startswith(f"this run lost the lease of workdir {run_dir} (taken over by "
                                 f"host elsewhere pid 7 (heartbeat ")
  assert str(e.value).endswith("; stopping so that two runs never write it")
  assert lines[0].startswith(f"lost the lease of workdir {run_dir} (taken over by host "
                             f"elsewhere pid 7 ")
  assert _holder(run_dir)["run"] == "theirs"  # the release left the new holder's lease alone


def test_two_takers_of_a_stale_lease_one_wins(run_dir):
  for _ in range(3):
    _plant(run_dir, heartbeat=time.time() - 300)
    barrier, won, refused = threading.Barrier(2), [], []

    def take():
      mine = lease.Lease(run_dir, log=lambda line: None)
      barrier.wait()
      try:
        won.append(mine.acquire())
      except ValueError as e:
        refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(refused) == 1, refused
    assert _holder(run_dir)["run"] == won[0].me["run"]
    assert f"is in use by host {HOST} pid {PID}" in refused[0]
    won[0].release()


def test_gcs_generation_preconditions(gcs):
  url = f"gs://bucket/lease-{uuid.uuid4().hex}/lease.json"
  a, b = lease._Gcs(url), lease._Gcs(url)
  first = a.create('{"run": "a"}')
  assert first and b.create('{"run": "b"}') is None
  assert b.read() == ({"run": "a"}, first)
  second = a.take('{"run": "a2"}', first)
  assert second and b.take('{"run": "b"}', first) is None  # a racing taker with the old one
  assert a.read() == ({"run": "a2"}, second)


def test_pod_followers_fail_with_process_0(tmp_path, monkeypatch):
  """Process 1 of two, as if process 0 was refused, then as if it lost the lease later."""
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  said = []
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: said.pop(0))
  said[:] = [0]
  with pytest.raises(ValueError, match="is in use by another run, or its lease cannot be taken"):
    with lease.hold(paths.path(tmp_path)):
      pass
  said[:] = [1, 0, 1]
  with lease.hold(paths.path(tmp_path)) as held:
    held.check()
    with pytest.raises(ValueError, match="lost the lease of workdir .* \\(process 0 says why\\)"):
      held.check()
  assert not (tmp_path / "lease.json").exists()  # only process 0 writes one
