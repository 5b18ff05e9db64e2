"""One run per workdir: `lease.json` in the workdir names its holder, who renews it.

    with lease.hold(run_dir, log=log) as held:  # or a one-line ValueError naming the holder
      ...
      held.check()  # before each save, on every process: raises if the lease was taken over

The holder (host, pid, start time, a random run id) renews its heartbeat every `heartbeat_secs`
(15 s) from a daemon thread. A lease whose heartbeat is older than `stale_secs` (120 s; hosts'
clocks agree within seconds), or whose process is gone from this host (a reused pid only delays
that to the timeout), is stale and taken over. Every write is conditional on the lease its
writer last saw (an flock locally, generation preconditions on gs://), so of two racing runs one
wins, and a holder that lost it learns so at its next heartbeat. On a pod process 0 holds it."""

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np

HEARTBEAT_SECS, STALE_SECS = 15.0, 120.0


class _Local:
  """lease.json on a local or NFS file system; a token is the content last seen. Each
  compare-and-write holds an flock on lease.json.lock (released if its process dies; NFS too)."""

  def __init__(self, file):
    self.file = os.fspath(file)

  def read(self):
    with contextlib.suppress(FileNotFoundError), open(self.file) as f:
      text = f.read()
      return json.loads(text), text

  def take(self, text, token):  # token None: only if there is none; text None: delete
    with open(self.file + ".lock", "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if (self.read() or (None, None))[1] != token:
        return None
      if text is None:
        return os.unlink(self.file)
      spare = f"{self.file}.{uuid.uuid4().hex}"
      with open(spare, "w") as f:
        f.write(text)
      os.replace(spare, self.file)  # readers never see half a lease
      return text

  def create(self, text):
    return self.take(text, None)

  def delete(self, token):
    self.take(None, token)


class _Gcs:
  """lease.json on gs://; a token is the object's generation (0: there is none)."""

  def __init__(self, url):
    from google.api_core import exceptions
    from google.cloud import storage
    bucket, _, self.name = url[len("gs://"):].partition("/")
    self.bucket, self.errors = storage.Client().bucket(bucket), exceptions

  def read(self):
    blob = self.bucket.blob(self.name)
    with contextlib.suppress(self.errors.NotFound):
      return json.loads(blob.download_as_bytes()), int(blob.generation)

  def take(self, text, generation):
    blob = self.bucket.blob(self.name)
    with contextlib.suppress(self.errors.PreconditionFailed):
      blob.upload_from_string(text, "application/json", if_generation_match=generation)
      return int(blob.generation)

  def create(self, text):
    return self.take(text, 0)

  def delete(self, generation):
    with contextlib.suppress(self.errors.NotFound, self.errors.PreconditionFailed):
      self.bucket.blob(self.name).delete(if_generation_match=generation)


def _pidns():
  with contextlib.suppress(OSError):
    return os.readlink("/proc/self/ns/pid")  # pids compare only within one namespace


def _dead(holder) -> bool:
  """Whether `holder` ran on this host, in this pid namespace, and has exited."""
  if (holder.get("host"), holder.get("pidns")) != (socket.gethostname(), _pidns()):
    return False
  try:
    os.kill(int(holder["pid"]), 0)
    with open(f"/proc/{int(holder['pid'])}/stat") as f:  # a zombie: exited, not yet reaped
      return f.read().rpartition(")")[2].split()[0] == "Z"
  except ProcessLookupError:
    return True
  except Exception:  # alive under another user, no /proc, or no pid
    return False


def _who(holder) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return (f"host {holder.get('host')} pid {holder.get('pid')} (heartbeat "
          f"{max(0, time.time() - holder.get('heartbeat', 0)):.0f} s ago, since {started})")


class Lease:
  """The hold on `run_dir`: `lost` turns True once another run has taken it over."""

  def __init__(self, run_dir, *, log=print, heartbeat_secs=HEARTBEAT_SECS, stale_secs=STALE_SECS):
    self.run_dir, self.log, self.heartbeat_secs, self.stale_secs = run_dir, log, heartbeat_secs, stale_secs
    file = str(run_dir / "lease.json")
    self.store = _Gcs(file) if file.startswith("gs://") else _Local(file)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pidns(),
               "started": time.time(), "run": uuid.uuid4().hex}
    self.token, self.lost, self.why, self._stop = None, False, None, threading.Event()

  def _text(self):
    return json.dumps({**self.me, "heartbeat": time.time()})

  def acquire(self) -> "Lease":
    """Creates the lease or takes over a stale one, else a one-line ValueError."""
    holder = None
    for _ in range(5):  # a retry follows another run's move between our read and write
      if (token := self.store.create(self._text())) is not None:
        self.token = token
        break
      if (seen := self.store.read()) is None:
        continue
      (holder, token), age = seen, time.time() - seen[0].get("heartbeat", 0)
      if holder.get("run") == self.me["run"]:  # a retried write that had landed after all
        self.token = token
        break
      if age <= self.stale_secs and not _dead(holder):
        break
      if (token := self.store.take(self._text(), token)) is not None:
        self.token = token
        self.log(f"took over the stale lease of {holder.get('host')}:{holder.get('pid')} "
                 f"(last heartbeat {age:.0f} s ago)")
        break
    if self.token is None:
      raise ValueError(f"workdir {self.run_dir} is in use by "
                       f"{_who(holder) if holder else 'another run'}; stop that run, or wait "
                       f"{self.stale_secs:.0f} s after it died, or use another --workdir")
    self.renewed, self._thread = time.time(), threading.Thread(target=self._beat, daemon=True,
                                                           name="llmjax-lease")
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(self.heartbeat_secs):
      try:
        token = self.store.take(self._text(), self.token)
      except Exception:  # a transient storage error: the next beat tries again
        if time.time() - self.renewed > self.stale_secs:  # others may take it over now
          self._lose(f"not renewed for {self.stale_secs:.0f} s: the storage fails")
          return
        continue
      if token is None:
        seen = self.store.read()
        if seen and seen[0].get("run") == self.me["run"]:  # a retried write that had landed
          self.token, self.renewed = seen[1], time.time()
          continue
        self._lose(f"taken over by {_who(seen[0])}" if seen else "lease.json was removed")
        return
      self.token, self.renewed = token, time.time()

  def _lose(self, why):
    self.lost, self.why = True, why
    self.log(f"lost the lease of workdir {self.run_dir} ({why}); stopping before the next save")

  def check(self) -> None:
    """A one-line ValueError if another run took the lease over; collective on a pod."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if not multihost_utils.broadcast_one_to_all(np.int32(self.lost)):
        return
      self.why = self.why or "process 0 says why"
    elif not self.lost:
      return
    raise ValueError(f"this run lost the lease of workdir {self.run_dir} ({self.why}); "
                     f"stopping so that two runs never write it")

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    if not self.lost:
      self.store.delete(self.token)


class _Follower(Lease):
  """The lease as the processes of a pod other than 0 see it: `check` joins the collective."""

  def __init__(self, run_dir):
    self.run_dir, self.lost, self.why = run_dir, False, None


@contextlib.contextmanager
def hold(run_dir, *, log=print, heartbeat_secs=HEARTBEAT_SECS, stale_secs=STALE_SECS):
  """Holds `run_dir`'s lease for the block, released however it ends; a one-line ValueError
  (on every process of a pod) if another live run holds it."""
  lease, error = None, None
  if jax.process_index() == 0:
    try:
      lease = Lease(run_dir, log=log, heartbeat_secs=heartbeat_secs, stale_secs=stale_secs)
      lease.acquire()
    except Exception as e:  # the other processes hear of it before it is raised
      lease, error = None, e
  try:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if not multihost_utils.broadcast_one_to_all(np.int32(error is None)) and error is None:
        error = ValueError(f"workdir {run_dir} is in use by another run, or its lease cannot "
                           f"be taken (process 0 says which)")
    if error is not None:
      raise error
    yield lease or _Follower(run_dir)
  finally:
    if lease is not None:
      lease.release()
