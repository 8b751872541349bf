"""Run outputs: metrics.jsonl, TensorBoard events and a PNG of the curves.

Only process 0 writes; other processes get a writer that does nothing, so
multi-host runs write one copy of each file.
"""

import json
import math
import os
from typing import Any

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricWriter:
  """Appends `{"step": ..., **scalars}` lines to metrics.jsonl and TensorBoard.

  An earlier attempt of the run may have logged steps after its last checkpoint.
  Their records are dropped from both outputs, so the resumed run writes each
  step once.

  Args:
    workdir: the run's work directory.
    start_step: the step the run starts or resumes at (0 for a fresh run).
    enabled: whether this process writes (default: process 0 only).
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool | None = None):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      _drop_records_after(os.path.join(workdir, METRICS_FILE), start_step)
      from tensorboardX import SummaryWriter  # Imported here: only process 0 needs it.

      # TensorBoard hides the events of steps >= purge_step written before.
      self._tensorboard = SummaryWriter(
          os.path.join(workdir, "tensorboard"), purge_step=start_step + 1
      )

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    """Writes scalars (names like 'train/loss', 'eval/accuracy') for one step."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step":
        self._tensorboard.add_scalar(name, value, global_step=int(step))

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites the metrics file without records past `step` (and without partial lines)."""
  if not os.path.exists(path):
    return
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        if record["step"] <= step:
          records.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue  # A partial line left by a killed process.
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.writelines(records)
  os.replace(temporary, path)  # Atomic: a kill now leaves the old or the new file.


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Reads metrics.jsonl; a run resumed after a stop may repeat steps, and the last record wins.

  Lines that are not JSON objects with a step, such as the partial line a
  killed process can leave, are skipped with a warning.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  by_step_and_keys: dict[tuple[int, tuple[str, ...]], dict] = {}
  skipped = 0
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
        by_step_and_keys[(record["step"], tuple(sorted(record)))] = record
      except (ValueError, KeyError, TypeError):
        # A process killed while appending leaves a partial last line.
        skipped += 1
  if skipped:
    logging.warning("Skipped %d unreadable line(s) of %s.", skipped, path)
  return sorted(by_step_and_keys.values(), key=lambda r: r["step"])


def plot_curves(workdir: str) -> str | None:
  """Plots train/eval loss and accuracy against step into CURVES_FILE; returns its path."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib  # Imported here so that importing jaxbase does not pull in matplotlib.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def series(name):
    points = [(r["step"], r[name]) for r in records if name in r and math.isfinite(r[name])]
    return [p[0] for p in points], [p[1] for p in points]

  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for name, label in (("train/loss", "train"), ("eval/loss", "eval")):
    steps, values = series(name)
    if steps:
      loss_ax.plot(steps, values, label=label, marker="o" if name.startswith("eval") else None)
  for name, label in (("train/top1", "train top-1"), ("eval/accuracy", "eval top-1")):
    steps, values = series(name)
    if steps:
      acc_ax.plot(steps, values, label=label, marker="o" if name.startswith("eval") else None)
  # A log scale keeps early eval spikes from flattening the rest of the curve.
  loss_ax.set(xlabel="step", ylabel="cross-entropy", title="loss", yscale="log")
  acc_ax.set(xlabel="step", ylabel="accuracy", title="top-1 accuracy", ylim=(0, 1))
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, CURVES_FILE)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
