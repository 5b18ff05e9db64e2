"""Training with a gs:// workdir, against the local Cloud Storage emulator (the `gcs` fixture):
resume after SIGKILL bit for bit, two processes writing one checkpoint, the bucket checked
before any work."""

import signal
import time

import pytest

from llmjax import checkpoint, paths, train
from llmjax.metrics import read_metrics
from tests.train.robustness_test import _free_port, small_config
from tests.train.train_test import SMALL, losses, run_main


def _committed(url: str) -> bool:
  """Whether Orbax has finished the checkpoint at gs:// `url` (its commit marker exists)."""
  from google.cloud import storage
  bucket, _, name = url[len("gs://"):].partition("/")
  return storage.Client().bucket(bucket).blob(f"{name}/commit_success.txt").exists()


def test_gs_workdir_resumes_bitwise_after_sigkill(gcs):
  """A gs:// run killed -9 once its step-2 checkpoint is committed resumes from the bucket
  and logs the uninterrupted run's losses bit for bit; load_model reads the run back. (Two
  processes writing one checkpoint into the bucket: robustness_test's multi-host test.)"""
  flags = SMALL + ["--config.train.steps=4", "--config.train.checkpoint_every=2",
                   "--config.train.eval_every=0"]
  code, _, err = run_main("gs://bucket/train/a", *flags)
  assert code == 0, err[-2000:]
  proc = run_main("gs://bucket/train/b", *flags, wait=False)
  deadline = time.time() + 300
  while not _committed("gs://bucket/train/b/checkpoints/2") and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  code, out, err = run_main("gs://bucket/train/b", *flags)
  assert code == 0, err[-2000:]
  assert "resumed from gs://bucket/train/b/checkpoints at step 2" in out, out
  a, b = losses("gs://bucket/train/a"), losses("gs://bucket/train/b")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a == b, (a, b)
  model, params = checkpoint.load_model("gs://bucket/train/b")
  assert type(model).__name__ == "GPT" and params["wte"]["embedding"].shape == (384, 128)


def test_unusable_bucket_is_refused_in_one_line_before_work(gcs, monkeypatch):
  """A bucket that doesn't exist, or storage that doesn't answer, is one line within seconds
  and no local ./gs:/ directory appears."""
  assert read_metrics("gs://bucket/nothing-here") == []
  start = time.time()
  with pytest.raises(ValueError, match=r"^gs://no-such-bucket/run: bucket gs://no-such-bucket "
                                       r"does not exist$"):
    train.train(small_config(1), "gs://no-such-bucket/run", log=lambda line: None)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")
  with pytest.raises(ValueError, match=r"bucket gs://bucket cannot be reached") as e:
    train.train(small_config(1), "gs://bucket/run", log=lambda line: None)
  assert "\n" not in str(e.value) and time.time() - start < 10
  assert not paths.path("gs:").exists()
