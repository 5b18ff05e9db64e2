"""The run's checkpoints: the sharded train state and every process's data-iterator position.

    ckpts = Checkpoints(run_dir / "checkpoints", every=500, keep=3)
    state, step, window = ckpts.restore(abstract, it)   # Nones when there is none yet
    if ckpts.should_save(step): ckpts.save(step, state, it, window)   # asynchronous
    ckpts.close(step)                             # waits for the last save

Orbax writes them (local or gs://); a failed save, even in the background, surfaces as a
CheckpointError naming the last complete checkpoint's step.

Integrity: Orbax 0.12 keeps no checksums of array data (OCDBT's CRC32C covers its b-tree only), so
once step N is committed (known at the next `save`, `wait` or `close`) each process writes
N/_CHECKSUMS.process_<i>-of-<n>.json, the size and CRC32C of each file it wrote (read back locally,
on a thread unless keep=1; one listing on gs://). `restore` checks the newest checkpoint (all
processes agree on the verdict); one failing the check or the restore is reported in one line,
moved aside to <step>.corrupt (never deleted), and the next newest tried, down to step 0. One
lacking a manifest is restored unverified, with a warning; a failed restore of one whose every
byte checks out is no corruption: its error is raised."""

import base64
import concurrent.futures
import contextlib
import json
import os
import re
import threading
import uuid

import google_crc32c
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from llmjax import paths

MANIFEST = "_CHECKSUMS"  # <step>/_CHECKSUMS.process_<i>-of-<n>.json
_MANIFEST_NAME = re.compile(rf"{MANIFEST}\.process_(\d+)-of-(\d+)\.json")
_OWNER = re.compile(r"(?:^|[/._-])process_(\d+)(?=$|[/._-])")
_BLOCK = 1 << 20  # read size: 1 MiB reads hash fastest (they stay in the CPU's cache)
_READERS = 4


class CheckpointError(RuntimeError):
  """Writing a checkpoint failed (disk full, no permission); the last complete one is intact."""


class Checkpoints:
  """Saves every `every` steps and at an announced preemption (not at the first step, as Orbax
  would), keeping `keep`; corrupt checkpoints are reported to `log` (default absl's warning)."""

  def __init__(self, directory, every: int, keep: int, *, log=None, verify: bool = True):
    policies = ocp.checkpoint_managers
    policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                     policies.PreemptionCheckpointingPolicy()])
    self.directory = directory
    self._keep, self._log, self._verify = keep, log or logging.warning, verify
    self._owed, self._writer = None, None  # the step whose checksums are owed; their writer
    self._manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        save_decision_policy=policy, max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def intact(self) -> str:
    """What is intact, in words, for messages."""
    step = self.latest_step()
    return ("there is no complete checkpoint yet" if step is None else
            f"the last complete checkpoint (step {step}) is intact")

  def restore(self, abstract, it):
    """(state, step, log window: what `save` got as `window`) of the newest intact checkpoint,
    `it` set to its data position; (None, None, None) without one."""
    fresh = it.get_state()
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      aside = self._aside_name(step)  # chosen before any process moves anything
      # Agreed before restoring: Orbax's restore has collectives of its own.
      problem, restored = _agree(self._check(step)), None
      if problem is None:
        unchecked = self._unchecked(step) if self._verify else ""
        if unchecked:
          self._log(f"checkpoint {step} has no checksums from {unchecked} (saved before they "
                    f"were kept, or stopped before writing them): restoring it unverified")
        try:
          args = {"state": ocp.args.StandardRestore(abstract),
                  "data": grain.checkpoint.CheckpointRestore(it)}
          if (self._step_dir(step) / "metrics").exists():
            args["metrics"] = ocp.args.JsonRestore()
          restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # unreadable: truncated, emptied or missing files
          if not unchecked:  # every byte is as written: not corruption, a real error
            raise
          problem = f"unreadable: {paths.error_line(e)}"
        if unchecked:  # the same on every process
          problem = _agree(problem)
      if problem is None:
        return restored["state"], step, restored.get("metrics")
      self._set_aside(step, aside)
      after = (f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else
               "no older checkpoint: training starts from step 0")
      self._log(f"checkpoint {step} is corrupt ({problem}); moved to {aside}; {after}")
    if steps:
      it.set_state(fresh)  # a failed restore may have moved it
    return None, None, None

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, it, window=None) -> None:
    """Saves asynchronously, with `window` (JSON): the metrics since the last log line."""
    with self._errors(step):
      if self._keep == 1:  # this save's commit deletes the previous step: checksum it first
        self._manager.wait_until_finished()
        self._settle(background=False)
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it),
          metrics=ocp.args.JsonSave(window or {})), force=True)
      self._settle(background=True)  # Orbax finished the previous save before this one
      if saved:
        self._owed = step

  def wait(self, step: int) -> None:
    with self._errors(step):
      self._manager.wait_until_finished()
      self._settle(background=False)

  def close(self, step: int) -> None:
    with self._errors(step):
      self._manager.close()
      self._settle(background=False)

  @contextlib.contextmanager
  def _errors(self, step: int):
    """Turns a failed (possibly earlier, asynchronous) save into a CheckpointError."""
    try:
      yield
    except Exception as e:  # Orbax reraises a background write's error at the next call
      self._owed = None
      raise CheckpointError(f"writing a checkpoint in {self.directory} failed by step {step}: "
                            f"{paths.error_text(e, last=True)}; {self.intact()}") from e

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _settle(self, background: bool) -> None:
    """Writes this process's checksums of the last step saved, on a thread or here."""
    if self._writer is not None:
      self._writer.join()
      self._writer = None
    if self._owed is None:
      return
    step, self._owed = self._owed, None
    if background:
      self._writer = threading.Thread(target=self._write_checksums, args=(step,), daemon=True,
                                      name=f"checksums-{step}")
      self._writer.start()
    else:
      self._write_checksums(step)

  def _write_checksums(self, step: int) -> None:
    """N/_CHECKSUMS.process_<i>-of-<n>.json; a failure costs only the verification."""
    index, count = jax.process_index(), jax.process_count()
    step_dir = self._step_dir(step)
    try:
      owned = {rel: entry for rel, entry in _listing(step_dir).items()
               if _owner(rel, count) == index}
      text = json.dumps({"step": step, "crc32c": _checksums(step_dir, owned)}, sort_keys=True)
      manifest = step_dir / f"{MANIFEST}.process_{index}-of-{count}.json"
      if paths.is_url(step_dir):  # an object appears whole or not at all
        manifest.write_text(text)
      else:
        part = step_dir / f".{manifest.name}.{uuid.uuid4().hex[:8]}.part"
        part.write_text(text)
        part.rename(manifest)
    except Exception as e:  # the step deleted meanwhile, a full disk: it stays restorable
      logging.warning("checkpoint %d: writing its checksums failed (%s); it will be restored "
                      "unverified", step, paths.error_line(e))

  def _manifests(self, step: int) -> tuple[dict[int, epath.Path], int]:
    """({process: its manifest}, the number of processes that saved the step; 0: unknown)."""
    found, count = {}, 0
    for path in self._step_dir(step).iterdir():
      if m := _MANIFEST_NAME.fullmatch(path.name):
        found[int(m.group(1))] = path
        count = max(count, int(m.group(2)))
    return found, count

  def _unchecked(self, step: int) -> str:
    """Whose checksums the step lacks, in words ('' when it has all of them)."""
    found, count = self._manifests(step)
    missing = ", ".join(f"process {i}" for i in range(count) if i not in found)
    return missing if found else "any process"

  def _check(self, step: int) -> str | None:
    """What is wrong with this process's share of the step's manifests ('FILE: why'), or None."""
    if not self._verify:
      return None
    step_dir = self._step_dir(step)
    try:
      found, _ = self._manifests(step)
      mine = [found[i] for i in sorted(found) if i % jax.process_count() == jax.process_index()]
      if not mine:
        return None
      listing = _listing(step_dir)
      for manifest in mine:
        try:
          written = json.loads(manifest.read_text())["crc32c"]
        except (ValueError, KeyError, TypeError) as e:
          return f"{manifest.name}: unreadable ({paths.error_line(e)})"
        for rel in sorted(written):
          if rel not in listing:
            return f"{rel}: missing"
          if listing[rel][0] != written[rel][0]:
            return f"{rel}: {listing[rel][0]} bytes, {written[rel][0]} written"
        actual = _checksums(step_dir, {rel: listing[rel] for rel in written})
        for rel in sorted(written):
          if actual[rel] != written[rel]:
            return f"{rel}: checksum mismatch"
    except OSError as e:  # a file that cannot be read at all
      return f"unreadable: {paths.error_line(e)}"
    return None

  def _aside_name(self, step: int) -> epath.Path:
    """<step>.corrupt, or .corrupt-2, -3, ... if taken (no '_<digits>' Orbax would parse)."""
    names = {p.name for p in epath.Path(self.directory).iterdir()}
    name, n = f"{step}.corrupt", 1
    while name in names:
      n += 1
      name = f"{step}.corrupt-{n}"
    return epath.Path(self.directory) / name

  def _set_aside(self, step: int, aside: epath.Path) -> None:
    if jax.process_index() == 0:
      _move(self._step_dir(step), aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"llmjax checkpoint {step} set aside")
    self._manager.reload()


def _filesystem(path):
  """(fsspec filesystem, path without its scheme) of a URL: epath's own instance (the same
  arguments), so that the listings it caches see our changes."""
  import fsspec
  scheme = str(path).split("://")[0]
  fs = (fsspec.filesystem("gcs", finalize_on_close=True) if scheme in ("gs", "gcs") else
        fsspec.filesystem(scheme))
  return fs, fs._strip_protocol(str(path)).rstrip("/")


def _move(source: epath.Path, target: epath.Path) -> None:
  """A rename locally; a server-side copy then a delete for URLs (epath's rename tries a
  move call per object first, which buckets without a hierarchical namespace refuse)."""
  if not paths.is_url(source):
    source.rename(target)
    return
  fs, src = _filesystem(source)
  _, dst = _filesystem(target)
  fs.copy(src, dst, recursive=True)
  fs.rm(src, recursive=True)
  fs.invalidate_cache(src.rsplit("/", 1)[0])


def _owner(rel: str, count: int) -> int:
  """The process that wrote file `rel` of a step: a `process_<i>` in its path, else 0."""
  m = _OWNER.search(rel)
  return int(m.group(1)) % count if m else 0


def _listing(step_dir: epath.Path) -> dict[str, list]:
  """{path relative to step_dir: [size, CRC32C hex or None]} of each file but the manifests."""
  out, root = {}, str(step_dir)
  if not paths.is_url(root):
    for parent, _, names in os.walk(root):
      for name in names:
        full = os.path.join(parent, name)
        out[os.path.relpath(full, root)] = [os.stat(full).st_size, None]
  else:  # one listing; Cloud Storage's carries each object's CRC32C
    fs, prefix = _filesystem(root)
    fs.invalidate_cache(prefix)
    for full, info in fs.find(prefix, detail=True).items():
      crc = info.get("crc32c")
      out[full[len(prefix) + 1:]] = [int(info["size"]),
                                     base64.b64decode(crc).hex() if crc else None]
  return {rel: entry for rel, entry in out.items()
          if not rel.startswith((MANIFEST, ".")) and "/." not in rel}


def _checksums(step_dir: epath.Path, entries: dict[str, list]) -> dict[str, list]:
  """{rel: [size, CRC32C hex]}: the listing's where it has one, else the file read."""
  def one(rel):
    size, crc = entries[rel]
    return rel, [size, crc] if crc is not None else _crc32c(step_dir / rel)
  with concurrent.futures.ThreadPoolExecutor(_READERS) as pool:
    return dict(pool.map(one, sorted(entries)))


def _crc32c(path: epath.Path) -> list:
  crc, size = 0, 0
  with (path.open("rb") if paths.is_url(path) else open(path, "rb", buffering=0)) as f:
    while chunk := f.read(_BLOCK):
      crc = google_crc32c.extend(crc, chunk)
      size += len(chunk)
  return [size, f"{crc:08x}"]


def _agree(problem: str | None) -> str | None:
  """The first process's problem with a checkpoint if any process has one (all skip it)."""
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils
  raw = (problem or "").encode()[:1024]
  mine = np.zeros(1024, np.uint8)
  mine[:len(raw)] = np.frombuffer(raw, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 1024)
  return next((bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows if r.any()), None)
