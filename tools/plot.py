"""Plots metrics against the step for one or several workdirs into a PNG.

    python tools/plot.py --out=curves.png /tmp/sweep/RUN_A /tmp/sweep/RUN_B
    python tools/plot.py --out=acc.png --workdirs='/tmp/sweep/*' --metrics=eval/loss,eval/accuracy
    python tools/plot.py --out=gs://BUCKET/plots/sweep.png --workdirs='gs://BUCKET/sweep/*'

One subplot per metric (default train/loss and eval/loss), one line per workdir, labelled by
the directory's name. The values come from each workdir's metrics.jsonl; a workdir that lacks
a metric is left out of that subplot, a metric that no workdir has is an error. A step logged
twice (a run resumed after a kill) keeps its last value. Workdirs, their globs and --out may
be gs:// URLs (through llmjax.paths); an unreachable bucket is refused in one line.
"""

from __future__ import annotations

import io
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmjax import paths  # noqa: E402

flags.DEFINE_string("out", None, "The PNG to write.", required=True)
flags.DEFINE_list("workdirs", [], "Workdirs or globs (comma-separated); or give them as args.")
flags.DEFINE_list("metrics", ["train/loss", "eval/loss"], "One subplot per metric.")
flags.DEFINE_bool("log_y", False, "Logarithmic y axes.")
FLAGS = flags.FLAGS


def load(workdirs: list[str]) -> dict[str, list[dict]]:
  """label -> metric records of each workdir; labels are directory names (paths if those clash)."""
  from llmjax.metrics import read_metrics
  paths.check_buckets(workdirs)
  for workdir in workdirs:
    if not (paths.path(workdir) / "metrics.jsonl").is_file():
      raise ValueError(f"{workdir} has no metrics.jsonl")
  full = [str(paths.path(w)) if paths.is_url(w) else os.path.normpath(w) for w in workdirs]
  names = [paths.path(w).name for w in full]
  labels = names if len(set(names)) == len(names) else full
  return {label: read_metrics(w) for label, w in zip(labels, workdirs)}


def curve(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, by step; a step logged twice keeps its last value."""
  points = {r["step"]: r[metric] for r in records if metric in r}
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def plot(runs: dict[str, list[dict]], metrics: list[str], out: str, log_y: bool = False) -> None:
  """Writes the PNG (a local path or a gs:// URL): a subplot per metric, a line per run."""
  for metric in metrics:
    if not any(curve(records, metric)[0] for records in runs.values()):
      have = sorted({k for records in runs.values() for r in records for k in r} - {"step"})
      raise ValueError(f"no workdir has the metric {metric!r}; they have {', '.join(have)}")
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for label, records in runs.items():
      steps, values = curve(records, metric)
      if steps:
        ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
    ax.set(title=metric, xlabel="step", yscale="log" if log_y else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, dpi=100, format=paths.path(out).suffix[1:] or "png")
  plt.close(fig)
  target = paths.path(out)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(image.getvalue())


def expand(patterns: list[str]) -> list[str]:
  """The workdirs that paths or globs (local or gs://) name; a pattern matching no directory
  stays as it is, so that load() names it."""
  paths.check_buckets(patterns)
  return [w for p in patterns
          for w in ([m for m in paths.glob(p) if paths.path(m).is_dir()] or [p])]


def main(argv):
  patterns = FLAGS.workdirs + argv[1:]
  if not patterns or not FLAGS.metrics:
    raise app.UsageError("give one or more workdirs and at least one metric")
  try:
    paths.check_bucket(FLAGS.out)
    workdirs = expand(patterns)
    plot(load(workdirs), FLAGS.metrics, FLAGS.out, FLAGS.log_y)
  except (OSError, ValueError) as e:
    raise SystemExit(f"plot: {e}") from None
  print(f"wrote {FLAGS.out}: {', '.join(FLAGS.metrics)} of {len(workdirs)} workdirs")


if __name__ == "__main__":
  app.run(main)
