"""Improvement studies: a baseline, each lever alone, and the levers combined, over seeds.

A `Table` names a baseline config and a list of `Lever`s, each a set of config
overrides. `run_table` trains every row for every seed in its own work
directory (`STUDY_DIR/ROW/seed_N`), so an interrupted study resumes where it
stopped and a finished run is read back instead of trained again. A work
directory whose saved config differs from the row's config is rejected by the
trainer with the differing keys.

A transfer lever starts from a pretraining run: the table lists it as a
`Pretraining`, and the lever's overrides name it with `pretrained(NAME)` (for
example `{"init.checkpoint": pretrained("five-classes")}`). `run_table` trains
each pretraining run that a selected row needs once, in
`STUDY_DIR/pretraining/NAME`, before the rows, and passes its folder to them.
Every seed of a row fine-tunes from that one pretraining run.

`summarize` turns the runs into rows of mean and standard deviation over seeds,
with the difference to the baseline, and `markdown_table`, `plot_bars` and
`update_benchmarks` write them out.
"""

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

ROBUSTNESS_FILE = "study_robustness.json"


@dataclasses.dataclass(frozen=True)
class Lever:
  """One improvement: a row name, the config values it sets, and what it means."""

  name: str
  overrides: Mapping[str, Any]
  description: str


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """A run that transfer levers start from: a name, its config, and what it is."""

  name: str
  config: Callable[[], ml_collections.ConfigDict]
  description: str


@dataclasses.dataclass(frozen=True)
class PretrainedDir:
  """An override value that `run_table` replaces by the work directory of a `Pretraining` run."""

  name: str

  def __repr__(self) -> str:
    return f"pretrained({self.name!r})"


def pretrained(name: str) -> PretrainedDir:
  """Returns the override value that `run_table` replaces by the folder of pretraining `name`."""
  return PretrainedDir(name)


@dataclasses.dataclass(frozen=True)
class Table:
  """A named study: the baseline config, its levers, and how to measure them.

  Attributes:
    name: the table name, used on the command line and in BENCHMARKS.md markers.
    base_config: returns the baseline config.
    levers: the rows after the baseline, each applied alone.
    combined: names of the levers merged into the last row.
    seeds: the default number of seeds per row.
    robust_attack: `(attack name, eps)` for a robust-accuracy column, or None.
    robust_examples: attack this many test examples, drawn once with a fixed
      seed (`robustness.fixed_subset`); 0 attacks the whole test set.
    budget: the per-row training budget in words, printed with the table.
    pretraining: runs that levers start from, named in their overrides with
      `pretrained(NAME)`.
  """

  name: str
  base_config: Callable[[], ml_collections.ConfigDict]
  levers: tuple[Lever, ...]
  combined: tuple[str, ...]
  seeds: int = 3
  robust_attack: tuple[str, float] | None = None
  robust_examples: int = 0
  budget: str = ""
  pretraining: tuple[Pretraining, ...] = ()

  def rows(self) -> list[tuple[str, dict[str, Any]]]:
    """Returns `(row name, overrides)` for the baseline, each lever, and the combination.

    Raises:
      ValueError: when `combined` names an unknown lever, or two combined levers
        set the same key to different values.
    """
    by_name = {lever.name: lever for lever in self.levers}
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name in self.combined:
      if name not in by_name:
        raise ValueError(
            f"table {self.name!r} combines unknown lever {name!r}; levers: {', '.join(by_name)}"
        )
      for key, value in by_name[name].overrides.items():
        if key in merged and merged[key] != value:
          raise ValueError(
              f"table {self.name!r}: levers {owner[key]!r} and {name!r} both set {key} "
              f"({merged[key]!r} vs {value!r}); combine only one of them"
          )
        merged[key] = value
        owner[key] = name
    known = {run.name for run in self.pretraining}
    for lever in self.levers:
      for key, value in lever.overrides.items():
        if isinstance(value, PretrainedDir) and value.name not in known:
          raise ValueError(
              f"table {self.name!r}: lever {lever.name!r} sets {key} from pretraining "
              f"{value.name!r}, which the table does not list; pretraining runs: "
              f"{', '.join(sorted(known)) or 'none'}"
          )
    rows = [("baseline", {})]
    rows += [(lever.name, dict(lever.overrides)) for lever in self.levers]
    if self.combined:
      rows.append(("combined: " + " + ".join(self.combined), merged))
    return rows


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys such as 'optim.lr' on `config` in place.

  Raises:
    KeyError: on a key the config does not have, naming it and the keys that
      exist at that level.
  """
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise KeyError(f"unknown config key {dotted!r}: no section {part!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(
          f"unknown config key {dotted!r}; keys at that level: {', '.join(sorted(node.keys()))}"
      )
    with node.ignore_type():
      node[leaf] = value


def row_directory(study_dir: str, row_name: str) -> str:
  """Returns the folder of a row: its name made safe for a path."""
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in row_name)
  return os.path.join(study_dir, safe)


def pretraining_directory(study_dir: str, name: str) -> str:
  """Returns the folder of a pretraining run of a study."""
  return os.path.join(study_dir, "pretraining", row_directory("", name))


def row_config(
    table: Table, overrides: Mapping[str, Any], seed: int, extra: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Builds one run's config: the baseline, the row's overrides, the seed, then `extra`."""
  config = table.base_config()
  apply_overrides(config, overrides)
  config.seed = seed
  apply_overrides(config, extra)
  return config


def run_table(
    table: Table,
    study_dir: str,
    *,
    seeds: int | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    only_rows: Sequence[str] | None = None,
    train_fn: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None,
    robust_fn: Callable[[str, str, float], float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
  """Trains every row of `table` for every seed; returns each row's per-seed results.

  Args:
    table: the study.
    study_dir: the study's folder; each run goes in `ROW/seed_N` below it.
    seeds: seeds per row (default `table.seeds`); seeds are 0 .. seeds - 1.
    extra_overrides: dotted keys applied to every run after the row's own,
      e.g. `{"data.path": ...}`, pretraining runs included. They are part of
      each run's saved config.
    only_rows: run only these row names (the baseline is always run, because
      every delta needs it).
    train_fn: `(config, workdir) -> results`, default
      `jaxbase.train.loop.train_and_evaluate`.
    robust_fn: `(workdir, attack, eps, num_examples) -> robust accuracy`,
      default `robust_accuracy`; used when the table has a robust attack.

  Returns:
    `{row name: [results of seed 0, seed 1, ...]}`, each the run's results.json
    plus `robust_accuracy` when measured.

  Raises:
    ValueError: on an unknown row name in `only_rows`.
  """
  if train_fn is None:
    from jaxbase.train.loop import train_and_evaluate as train_fn  # noqa: PLC0415
  if robust_fn is None:
    robust_fn = robust_accuracy
  seeds = table.seeds if seeds is None else seeds
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}")
  rows = table.rows()
  names = [name for name, _ in rows]
  if only_rows:
    unknown = [name for name in only_rows if name not in names]
    if unknown:
      raise ValueError(f"unknown rows {unknown} for table {table.name!r}; rows: {', '.join(names)}")
    rows = [(name, o) for name, o in rows if name == "baseline" or name in only_rows]

  pretraining = {run.name: run for run in table.pretraining}
  finished_pretraining: dict[str, str] = {}

  def resolve(overrides: Mapping[str, Any]) -> dict[str, Any]:
    resolved = {}
    for key, value in overrides.items():
      if isinstance(value, PretrainedDir):
        if value.name not in finished_pretraining:
          workdir = pretraining_directory(study_dir, value.name)
          config = pretraining[value.name].config()
          apply_overrides(config, extra_overrides or {})
          result = train_fn(config, workdir)
          if result.get("interrupted"):
            raise KeyboardInterrupt(
                f"pretraining run {workdir} stopped at step {result['steps']}; rerun the same "
                "command to resume"
            )
          finished_pretraining[value.name] = workdir
        value = finished_pretraining[value.name]
      resolved[key] = value
    return resolved

  results: dict[str, list[dict[str, Any]]] = {}
  for name, overrides in rows:
    results[name] = []
    overrides = resolve(overrides)
    for seed in range(seeds):
      workdir = os.path.join(row_directory(study_dir, name), f"seed_{seed}")
      config = row_config(table, overrides, seed, extra_overrides or {})
      result = dict(train_fn(config, workdir))
      if result.get("interrupted"):
        raise KeyboardInterrupt(
            f"run {workdir} stopped at step {result['steps']}; rerun the same command to resume"
        )
      if table.robust_attack is not None:
        attack, eps = table.robust_attack
        result["robust_accuracy"] = robust_fn(workdir, attack, eps, table.robust_examples)
      if result.get("received_signal"):
        # The run completed, but the user asked to stop: start no further run.
        raise KeyboardInterrupt(
            f"received {result['received_signal']} as {workdir} finished; rerun the same "
            "command to run the remaining rows"
        )
      results[name].append(result)
  return results


def robust_accuracy(workdir: str, attack: str, eps: float, num_examples: int = 0) -> float:
  """Returns the robust top-1 of a finished run's final checkpoint, cached in the work directory.

  `num_examples` > 0 attacks that many test examples drawn with a fixed seed.
  """
  cache_path = os.path.join(workdir, ROBUSTNESS_FILE)
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cached = json.load(f)
    if (
        cached["attack"] == attack
        and math.isclose(cached["eps"], eps)
        and cached.get("num_examples", 0) == num_examples
    ):
      return float(cached["robust_accuracy"])

  from jaxbase import robustness  # noqa: PLC0415
  from jaxbase.train.loop import restore_for_eval  # noqa: PLC0415

  run, state, step, config = restore_for_eval(workdir)
  images, labels = robustness.fixed_subset(
      run.dataset.test_images, run.dataset.test_labels, num_examples
  )
  report = robustness.evaluate_robustness(
      run.model,
      run.launcher,
      state,
      images,
      labels,
      attack_names=[attack],
      eps_values=[eps],
      global_batch_size=run.eval_batch_size,
      eval_flip=bool(config.get("eval_flip", False)),
  )
  accuracy = float(report["results"][0]["robust_accuracy"])
  with open(cache_path, "w") as f:
    json.dump(
        {
            "attack": attack,
            "eps": eps,
            "num_examples": num_examples,
            "step": step,
            "robust_accuracy": accuracy,
        },
        f,
    )
  return accuracy


@dataclasses.dataclass
class RowSummary:
  """Mean and standard deviation over seeds of one row, and its difference to the baseline."""

  name: str
  seeds: int
  accuracy_mean: float
  accuracy_std: float
  delta: float  # accuracy_mean minus the baseline's, in accuracy units (0.01 = 1 point).
  robust_mean: float | None
  robust_std: float | None
  robust_delta: float | None
  train_seconds_mean: float
  num_params: int


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return mean, std


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[RowSummary]:
  """Reduces per-seed results to one `RowSummary` per row; the first row is the baseline."""
  summaries = []
  baseline_accuracy = baseline_robust = None
  for name, runs in results.items():
    accuracy_mean, accuracy_std = _mean_std([r["eval_accuracy"] for r in runs])
    robust_mean = robust_std = None
    if all("robust_accuracy" in r for r in runs):
      robust_mean, robust_std = _mean_std([r["robust_accuracy"] for r in runs])
    if baseline_accuracy is None:
      baseline_accuracy, baseline_robust = accuracy_mean, robust_mean
    summaries.append(
        RowSummary(
            name=name,
            seeds=len(runs),
            accuracy_mean=accuracy_mean,
            accuracy_std=accuracy_std,
            delta=accuracy_mean - baseline_accuracy,
            robust_mean=robust_mean,
            robust_std=robust_std,
            robust_delta=(
                None
                if robust_mean is None or baseline_robust is None
                else robust_mean - baseline_robust
            ),
            train_seconds_mean=statistics.fmean([r["train_seconds"] for r in runs]),
            num_params=int(runs[0]["num_params"]),
        )
    )
  return summaries


def markdown_table(summaries: Sequence[RowSummary]) -> str:
  """Formats the summaries as a Markdown table; accuracies in percent, deltas in points."""
  robust = any(s.robust_mean is not None for s in summaries)
  header = "| row | seeds | test top-1 | delta |"
  rule = "|---|---|---|---|"
  if robust:
    header += " robust top-1 | robust delta |"
    rule += "---|---|"
  header += " train time | params |"
  rule += "---|---|"
  lines = [header, rule]
  for s in summaries:
    line = (
        f"| {s.name} | {s.seeds} | {100 * s.accuracy_mean:.2f} ± {100 * s.accuracy_std:.2f}% | "
        f"{100 * s.delta:+.2f} |"
    )
    if robust:
      if s.robust_mean is None:
        line += " - | - |"
      else:
        line += (
            f" {100 * s.robust_mean:.2f} ± {100 * s.robust_std:.2f}% | "
            f"{100 * s.robust_delta:+.2f} |"
        )
    line += f" {s.train_seconds_mean:.0f} s | {s.num_params:,} |"
    lines.append(line)
  return "\n".join(lines)


def plot_bars(summaries: Sequence[RowSummary], path: str, title: str) -> str:
  """Draws test top-1 (and robust top-1) per row with seed standard deviations; returns `path`."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  # The combined row's full name is in the table; the axis gets the short form.
  names = [s.name.split(":")[0] for s in summaries]
  positions = range(len(summaries))
  robust = any(s.robust_mean is not None for s in summaries)
  width = 0.4 if robust else 0.7
  figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(names)), 4.5))
  axis.bar(
      [p - (width / 2 if robust else 0) for p in positions],
      [100 * s.accuracy_mean for s in summaries],
      width,
      yerr=[100 * s.accuracy_std for s in summaries],
      label="test top-1",
      capsize=3,
  )
  if robust:
    axis.bar(
        [p + width / 2 for p in positions],
        [100 * (s.robust_mean or 0.0) for s in summaries],
        width,
        yerr=[100 * (s.robust_std or 0.0) for s in summaries],
        label="robust top-1",
        capsize=3,
    )
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, frameon=False)
  axis.axhline(100 * summaries[0].accuracy_mean, color="gray", linewidth=0.8, linestyle="--")
  axis.set_xticks(list(positions))
  axis.set_xticklabels(names, rotation=30, ha="right")
  axis.set_ylabel("accuracy (%)")
  axis.set_title(title)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def markers(table_name: str) -> tuple[str, str]:
  """Returns the begin and end markers of a table's section in BENCHMARKS.md."""
  return f"<!-- study:{table_name}:begin -->", f"<!-- study:{table_name}:end -->"


def update_benchmarks(path: str, table_name: str, section: str) -> None:
  """Replaces the text between the table's markers in `path`, or appends a new marked section.

  Raises:
    ValueError: when the file has only one of the two markers, or they are out
      of order, so nothing around them is overwritten by mistake.
  """
  begin, end = markers(table_name)
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  block = f"{begin}\n{section.strip()}\n{end}"
  has_begin, has_end = begin in text, end in text
  if has_begin != has_end or (has_begin and text.index(begin) > text.index(end)):
    raise ValueError(
        f"{path} has a damaged section for {table_name!r}: it needs {begin} followed by {end}. "
        "Fix or remove the markers by hand; the file was left unchanged."
    )
  if has_begin:
    start, stop = text.index(begin), text.index(end) + len(end)
    text = text[:start] + block + text[stop:]
  else:
    text = text.rstrip("\n") + f"\n\n{block}\n"
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)
