"""Hyperparameter sweeps over any config keys, run as an Optuna study in SQLite.

A sweep is a base config, a search space over dotted config keys and a
method: 'grid' (every combination), 'random', or 'tpe' (Optuna's adaptive
Tree-structured Parzen Estimator). Every trial trains in its own work
directory named after its values, and reports eval top-1 after each
evaluation, so `prune=True` stops trials below the median of earlier ones at
the same epoch (Optuna's MedianPruner).

The study lives in SWEEP_DIR/study.db, so an interrupted sweep resumes: the
finished trials are kept, and a trial that was running when the process died
is queued again with the same values and resumes from its checkpoint.
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import optuna
from absl import logging

from jaxbase import study as study_lib
from jaxbase.train import config_check

METHODS = ("grid", "random", "tpe")
STUDY_NAME = "sweep"
SPEC_ATTRIBUTE = "jaxbase_sweep_spec"


@dataclasses.dataclass(frozen=True)
class Parameter:
  """One searched config key.

  Attributes:
    key: dotted config key, e.g. 'optim.lr'.
    kind: 'choice' (the listed `values`), 'log' or 'uniform' (floats between
      `low` and `high`), or 'int' (integers from `low` to `high`).
  """

  key: str
  kind: str
  values: tuple[Any, ...] = ()
  low: float = 0.0
  high: float = 0.0

  def suggest(self, trial: optuna.Trial) -> Any:
    if self.kind == "choice":
      return trial.suggest_categorical(self.key, list(self.values))
    if self.kind == "int":
      return trial.suggest_int(self.key, int(self.low), int(self.high))
    return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def parse_parameter(text: str) -> Parameter:
  """Parses 'KEY=a,b,c', 'KEY=log:LOW:HIGH', 'KEY=uniform:LOW:HIGH' or 'KEY=int:LOW:HIGH'.

  Choice values are read as JSON where they parse (numbers, booleans), else
  kept as strings.

  Raises:
    ValueError: on a malformed specification, naming it and the accepted forms.
  """
  forms = "KEY=a,b,c or KEY=log:LOW:HIGH, KEY=uniform:LOW:HIGH, KEY=int:LOW:HIGH"
  key, sep, spec = text.partition("=")
  if not sep or not key or not spec:
    raise ValueError(f"invalid --param {text!r}; use {forms}")
  kind, _, bounds = spec.partition(":")
  if kind in ("log", "uniform", "int"):
    parts = bounds.split(":")
    try:
      low, high = (float(p) for p in parts)
    except ValueError:
      raise ValueError(f"invalid range in --param {text!r}; use {forms}") from None
    if not low < high:
      raise ValueError(f"--param {text!r}: LOW must be below HIGH")
    if kind == "log" and low <= 0:
      raise ValueError(f"--param {text!r}: a log range needs LOW > 0")
    return Parameter(key, kind, low=low, high=high)
  values = tuple(_parse_value(v) for v in spec.split(","))
  if len(set(map(repr, values))) != len(values):
    raise ValueError(f"--param {text!r} repeats a value")
  return Parameter(key, "choice", values=values)


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def trial_directory(sweep_dir: str, values: Mapping[str, Any]) -> str:
  """Returns the work directory of a trial: a readable name plus a hash of its values."""
  items = sorted(values.items())
  digest = hashlib.sha1(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]
  readable = "_".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in items)
  readable = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in readable)[:80]
  return os.path.join(sweep_dir, "trials", f"{readable}_{digest}")


def _short(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass
class Sweep:
  """A sweep's definition; `spec()` is stored with the study to detect a changed command."""

  base_config: ml_collections.ConfigDict
  parameters: Sequence[Parameter]
  method: str = "random"
  num_trials: int = 8
  prune: bool = False
  seed: int = 0
  metric: str = "eval_accuracy"  # or 'best_eval_accuracy'

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown sweep method {self.method!r}; use one of: {', '.join(METHODS)}")
    if not self.parameters:
      raise ValueError("a sweep needs at least one --param")
    keys = [p.key for p in self.parameters]
    if len(set(keys)) != len(keys):
      raise ValueError(f"a config key is searched twice: {keys}")
    for parameter in self.parameters:
      # Fails early, naming the key, when the config has no such key, and
      # rejects a listed value or range end the trainer would refuse, before
      # any trial spends time training.
      for value in parameter.values or (parameter.low, parameter.high):
        config = self.base_config.copy_and_resolve_references()
        study_lib.apply_overrides(config, {parameter.key: value})
        config_check.check_config(config)
    if self.method == "grid":
      continuous = [p.key for p in self.parameters if p.kind != "choice"]
      if continuous:
        raise ValueError(
            f"a grid needs listed values, but {', '.join(continuous)} are ranges; "
            "use --method random or tpe, or list values as KEY=a,b,c"
        )
    if self.num_trials < 1:
      raise ValueError(f"the number of trials must be >= 1, got {self.num_trials}")
    if self.metric not in ("eval_accuracy", "best_eval_accuracy"):
      raise ValueError(f"unknown sweep metric {self.metric!r}")

  def grid_size(self) -> int:
    return math.prod(len(p.values) for p in self.parameters)

  def spec(self) -> dict[str, Any]:
    return {
        "config": self.base_config.to_dict(),
        "parameters": [dataclasses.asdict(p) for p in self.parameters],
        "method": self.method,
        "prune": self.prune,
        "seed": self.seed,
        "metric": self.metric,
    }


def _sampler(sweep: Sweep) -> optuna.samplers.BaseSampler:
  if sweep.method == "grid":
    space = {p.key: list(p.values) for p in sweep.parameters}
    return optuna.samplers.GridSampler(space, seed=sweep.seed)
  if sweep.method == "random":
    return optuna.samplers.RandomSampler(seed=sweep.seed)
  return optuna.samplers.TPESampler(seed=sweep.seed)


def open_study(sweep: Sweep, sweep_dir: str) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
  """Creates or reopens the sweep's study, and queues again the trials a crash cut short.

  Raises:
    ValueError: when SWEEP_DIR contains a study of a different sweep (config,
      search space or method), listing what changed.
  """
  os.makedirs(sweep_dir, exist_ok=True)
  storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(sweep_dir, 'study.db')}")
  pruner = (
      optuna.pruners.MedianPruner(n_startup_trials=3) if sweep.prune else optuna.pruners.NopPruner()
  )
  study = optuna.create_study(
      storage=storage,
      sampler=_sampler(sweep),
      pruner=pruner,
      study_name=STUDY_NAME,
      direction="maximize",
      load_if_exists=True,
  )
  spec = json.loads(json.dumps(sweep.spec()))
  saved = study.user_attrs.get(SPEC_ATTRIBUTE)
  if saved is None:
    study.set_user_attr(SPEC_ATTRIBUTE, spec)
  elif saved != spec:
    changed = [
        f"{key} {json.dumps(saved.get(key))} there, {json.dumps(spec[key])} now"
        for key in spec
        if key != "config" and saved.get(key) != spec[key]
    ]
    if saved.get("config") != spec["config"]:
      changed.append("the base config (--config and its overrides)")
    raise ValueError(
        f"{sweep_dir} contains a sweep that differs from this command: {'; '.join(changed)}. "
        "Use a new --sweep_dir, or repeat the original command to resume that sweep."
    )

  # One process runs a sweep, so a trial still marked running was cut short.
  study_id = storage.get_study_id_from_name(STUDY_NAME)
  for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    logging.warning("Trial %d was cut short; it will run again from its checkpoint.", trial.number)
  settled = {
      json.dumps(t.params, sort_keys=True)
      for t in study.get_trials(
          deepcopy=False,
          states=(
              optuna.trial.TrialState.COMPLETE,
              optuna.trial.TrialState.PRUNED,
              optuna.trial.TrialState.WAITING,
          ),
      )
  }
  for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
    key = json.dumps(trial.params, sort_keys=True)
    if trial.params and key not in settled:
      study.enqueue_trial(trial.params)
      settled.add(key)
  return study, storage


def run_sweep(
    sweep: Sweep,
    sweep_dir: str,
    train_fn: Callable[..., dict[str, Any]] | None = None,
) -> optuna.Study:
  """Runs trials until `sweep.num_trials` have finished (completed or pruned).

  Args:
    sweep: the sweep definition.
    sweep_dir: folder of the study database, the trials' work directories and
      the result tables.
    train_fn: `(config, workdir, on_eval=...) -> results`, default
      `jaxbase.train.loop.train_and_evaluate`.

  Returns:
    The Optuna study.

  Raises:
    KeyboardInterrupt: when a signal stopped a trial (rerunning resumes it),
      or arrived as a trial finished (rerunning starts the next one).
  """
  if train_fn is None:
    from jaxbase.train.loop import train_and_evaluate as train_fn  # noqa: PLC0415

  study, _ = open_study(sweep, sweep_dir)
  finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
  target = min(sweep.num_trials, sweep.grid_size()) if sweep.method == "grid" else sweep.num_trials

  late_signals: list[str] = []

  def objective(trial: optuna.Trial) -> float:
    values = {p.key: p.suggest(trial) for p in sweep.parameters}
    config = sweep.base_config.copy_and_resolve_references()
    study_lib.apply_overrides(config, values)
    workdir = trial_directory(sweep_dir, values)
    trial.set_user_attr("workdir", workdir)

    def on_eval(epoch: int, evaluation: dict[str, float]) -> bool:
      trial.report(evaluation["accuracy"], epoch)
      return sweep.prune and trial.should_prune()

    results = train_fn(config, workdir, on_eval=on_eval)
    if results.get("interrupted") == "pruned":
      raise optuna.TrialPruned()
    if results.get("interrupted"):
      raise KeyboardInterrupt(f"trial {trial.number} was stopped by {results['interrupted']}")
    trial.set_user_attr("train_seconds", results["train_seconds"])
    trial.set_user_attr("eval_accuracy", results["eval_accuracy"])
    if results.get("received_signal"):
      late_signals.append(results["received_signal"])
    return float(results[sweep.metric])

  while True:
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    if done >= target:
      break
    study.optimize(objective, n_trials=1)
    if late_signals:
      # The trial completed and is recorded; stop before starting the next one.
      raise KeyboardInterrupt(
          f"received {late_signals[0]} as trial {len(study.trials) - 1} finished; rerun the "
          "same command to run the remaining trials"
      )
  return study


def write_results(study: optuna.Study, sweep_dir: str) -> tuple[str, str, str]:
  """Writes trials.csv, trials.md and best_over_trials.png; returns their paths."""
  trials = sorted(study.trials, key=lambda t: t.number)
  keys = sorted({k for t in trials for k in t.params})
  rows = []
  for trial in trials:
    state = trial.state.name.lower()
    if trial.state == optuna.trial.TrialState.FAIL:
      # A stopped or crashed trial is enqueued again; name the trial that reran it.
      reruns = [t.number for t in trials if t.number > trial.number and t.params == trial.params]
      if reruns:
        state = f"stopped, rerun as trial {reruns[0]}"
    rows.append(
        {
            "trial": trial.number,
            **{k: trial.params.get(k) for k in keys},
            "state": state,
            "score": trial.value,
            "train_seconds": trial.user_attrs.get("train_seconds"),
        }
    )
  csv_path = os.path.join(sweep_dir, "trials.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)

  lines = ["| trial | " + " | ".join(keys) + " | state | score | train time |"]
  lines.append("|---" * (len(keys) + 4) + "|")
  for row in rows:
    score = "-" if row["score"] is None else f"{100 * row['score']:.2f}%"
    seconds = "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f} s"
    values = " | ".join(_short(row[k]) for k in keys)
    lines.append(f"| {row['trial']} | {values} | {row['state']} | {score} | {seconds} |")
  markdown_path = os.path.join(sweep_dir, "trials.md")
  with open(markdown_path, "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  figure, axis = plt.subplots(figsize=(6, 4))
  if completed:
    numbers = [t.number for t in completed]
    scores = [100 * t.value for t in completed]
    best = [max(scores[: i + 1]) for i in range(len(scores))]
    axis.plot(numbers, scores, "o", label="trial")
    axis.step(numbers, best, where="post", label="best so far")
    axis.legend()
  axis.set_xlabel("trial")
  axis.set_ylabel("score (%)")
  axis.set_title("best score over trials")
  figure.tight_layout()
  plot_path = os.path.join(sweep_dir, "best_over_trials.png")
  figure.savefig(plot_path, dpi=120)
  plt.close(figure)
  return csv_path, markdown_path, plot_path
