"""Checkpoint integrity: a corrupt checkpoint is named, moved aside and skipped, and the run
resumes from the newest intact one, bit for bit."""

import json
import os
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from llmjax import train
from llmjax.train.checkpoints import MANIFEST, Checkpoints
from tests.train.robustness_test import small_config


def _config():
  return small_config(4, checkpoint_every=2, keep_checkpoints=3, eval_every=0)


def _corrupt(step_dir, how: str) -> str:
  """Damages checkpoint `step_dir` as `how` says; returns what the report must say (the
  file, relative to the step, and what is wrong with it)."""
  target = max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)  # array data
  size = target.stat().st_size
  if how == "bit flip":
    data = bytearray(target.read_bytes())
    data[size // 2] ^= 0x10
    target.write_bytes(bytes(data))
    why = "checksum mismatch"
  elif how == "truncation":
    os.truncate(target, size // 2)
    why = f"{size // 2} bytes, {size} written"
  elif how == "deleted file":
    target.unlink()
    why = "missing"
  else:  # emptied metadata
    target = step_dir / "state" / "_METADATA"
    why = f"0 bytes, {target.stat().st_size} written"
    target.write_text("")
  return f"{target.relative_to(step_dir)}: {why}"


def test_a_corrupt_checkpoint_is_named_moved_aside_and_skipped(tmp_path, caplog):
  """Checkpoint 4 of a 4-step run damaged in each of four ways, the run restarted: one line
  names the file and where the checkpoint went, the run resumes from step 2 without an error,
  and its losses of steps 3 and 4 equal an uninterrupted run's bit for bit. The damaged
  checkpoint is kept aside. (One test, not four: they share the uninterrupted run.)"""
  reference = train.train(_config(), str(tmp_path / "reference"), log=lambda line: None)
  losses = [(h["step"], h["train/loss"]) for h in reference.history if "train/loss" in h][2:]
  for how in ("bit flip", "truncation", "deleted file", "emptied metadata"):
    run = tmp_path / how.replace(" ", "_")
    shutil.copytree(tmp_path / "reference", run)
    problem = _corrupt(run / "checkpoints" / "4", how)
    lines = []
    caplog.clear()
    result = train.train(_config(), str(run), log=lines.append)
    said = lines + [r.getMessage() for r in caplog.records]
    assert [s for s in said if s.startswith("checkpoint ")] == [
        f"checkpoint 4 is corrupt ({problem}); moved to {run}/checkpoints/4.corrupt; falling "
        "back to step 2"], (how, said)
    assert f"resumed from {run}/checkpoints at step 2" in lines, (how, lines)
    assert [(h["step"], h["train/loss"]) for h in result.history if "train/loss" in h] == (
        losses), how
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "4.corrupt"], how


def _tiny(directory, steps, keep=3):
  """Checkpoints of a 64-float state at `steps` (state and window hold the step)."""
  ckpts = Checkpoints(directory, every=1, keep=keep)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  for s in steps:
    next(it)
    ckpts.save(s, {"w": jnp.full((64,), float(s))}, it, {"step": s})
  ckpts.close(steps[-1])
  return ckpts


def _restore(directory):
  """(w, step, window, iterator position, lines logged) of restoring `directory`."""
  lines = []
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  state, step, window = Checkpoints(directory, every=1, keep=3, log=lines.append).restore(
      abstract, it)
  return None if state is None else np.asarray(state["w"]), step, window, next(it), lines


def test_checkpoint_without_checksums_is_restored_unverified(tmp_path):
  """No manifest (a checkpoint of an older llmjax, or a kill between Orbax's commit and the
  manifest): restored with a warning if it reads; moved aside if it does not. With keep=1
  the checksums are written before the next save deletes the step."""
  _tiny(tmp_path / "one", [1, 2, 3], keep=1)
  assert [p.name for p in (tmp_path / "one" / "3").glob(f"{MANIFEST}*")] == [
      f"{MANIFEST}.process_0-of-1.json"]
  _tiny(tmp_path / "c", [1, 2])
  for manifest in (tmp_path / "c" / "2").glob(f"{MANIFEST}*"):
    manifest.unlink()
  w, step, window, position, lines = _restore(tmp_path / "c")
  assert step == 2 and window == {"step": 2} and (w == 2).all() and position == 2
  assert lines == ["checkpoint 2 has no checksums from any process (saved before they were "
                   "kept, or stopped before writing them): restoring it unverified"]
  (tmp_path / "c" / "2" / "state" / "_METADATA").write_text("")
  w, step, window, position, lines = _restore(tmp_path / "c")
  assert step == 1 and (w == 1).all() and position == 1
  assert lines[-1].startswith("checkpoint 2 is corrupt (unreadable: ") and lines[-1].endswith(
      f"moved to {tmp_path}/c/2.corrupt; falling back to step 1"), lines


def test_no_intact_checkpoint_starts_from_scratch(tmp_path):
  """Every checkpoint damaged: each is reported and moved aside, and the run starts at step 0
  with the data iterator where a new run's is."""
  _tiny(tmp_path, [1, 2])
  for step in (1, 2):
    (tmp_path / str(step) / "data" / "process_0-of-1.json").write_text("{}")
  w, step, window, position, lines = _restore(tmp_path)
  assert (w, step, window, position) == (None, None, None, 0)
  assert len(lines) == 2, lines
  for line, step, after in ((lines[0], 2, "falling back to step 1"),
                            (lines[1], 1, "no older checkpoint: training starts from step 0")):
    assert re.fullmatch(rf"checkpoint {step} is corrupt \(data/process_0-of-1.json: 2 bytes, "
                        rf"\d+ written\); moved to {tmp_path}/{step}.corrupt; {after}", line)
  assert sorted(os.listdir(tmp_path)) == ["1.corrupt", "2.corrupt"]


def test_gcs_checksums_are_the_objects_own(gcs):
  """On gs:// the manifest holds the CRC32C Cloud Storage keeps for each object (nothing is
  read back); an object overwritten with one flipped bit is caught and the step moved aside."""
  root = epath.Path("gs://bucket/integrity")
  _tiny(root, [1, 2])
  manifest = json.loads((root / "2" / f"{MANIFEST}.process_0-of-1.json").read_text())["crc32c"]
  target = root / "2" / "state" / "_sharding"
  assert manifest["state/_sharding"][0] == len(target.read_bytes())
  data = bytearray(target.read_bytes())
  data[0] ^= 1
  target.write_bytes(bytes(data))
  w, step, _, _, lines = _restore(root)
  assert step == 1 and (w == 1).all()
  assert lines == [f"checkpoint 2 is corrupt (state/_sharding: checksum mismatch); moved to "
                   f"{root}/2.corrupt; falling back to step 1"]
  assert (root / "2.corrupt" / "state" / "_sharding").exists()
