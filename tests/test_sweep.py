"""Tests for hyperparameter sweeps: parameter parsing, grid coverage, resume and pruning."""

import dataclasses
import os

import ml_collections
import optuna
import pytest

from jaxbase import sweep
from jaxbase.configs import digits_resnet
from jaxbase.study import apply_overrides
from jaxbase.train import loop


def _base():
  return ml_collections.ConfigDict(
      {"seed": 0, "num_epochs": 3, "optim": {"lr": 0.1, "weight_decay": 0.0}}
  )


def _grid(**kwargs):
  return sweep.Sweep(
      base_config=_base(),
      parameters=[
          sweep.parse_parameter("optim.lr=0.1,0.2,0.4"),
          sweep.parse_parameter("optim.weight_decay=0,0.001"),
      ],
      method="grid",
      num_trials=100,
      **kwargs,
  )


class FakeTrainer:
  """Scores lr * 1000 + weight_decay; can stop one call as a signal would."""

  def __init__(self, interrupt_call=None, accuracies_by_epoch=None, late_signal_call=None):
    self.calls = []
    self.interrupt_call = interrupt_call
    self.accuracies_by_epoch = accuracies_by_epoch
    self.late_signal_call = late_signal_call

  def __call__(self, config, workdir, on_eval=None):
    self.calls.append((workdir, config.optim.lr, config.optim.weight_decay))
    if len(self.calls) == self.interrupt_call:
      return {"interrupted": "SIGTERM", "steps": 1, "total_steps": 3}
    score = config.optim.lr * 1000 + config.optim.weight_decay
    if self.accuracies_by_epoch is not None:
      for epoch, accuracy in enumerate(self.accuracies_by_epoch(config), start=1):
        if on_eval(epoch, {"accuracy": accuracy}):
          return {"interrupted": "pruned", "steps": epoch, "total_steps": 3}
    results = {"eval_accuracy": score, "best_eval_accuracy": score, "train_seconds": 1.0}
    if len(self.calls) == self.late_signal_call:
      results["received_signal"] = "SIGINT"  # The run completed; the signal came after.
    return results


def _finished_params(study):
  return sorted(
      (t.params["optim.lr"], t.params["optim.weight_decay"])
      for t in study.trials
      if t.state == optuna.trial.TrialState.COMPLETE
  )


ALL_PAIRS = sorted((lr, wd) for lr in (0.1, 0.2, 0.4) for wd in (0, 0.001))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim.lr=0.1,0.2", sweep.Parameter("optim.lr", "choice", values=(0.1, 0.2))),
        ("optim.name=sgd,adamw", sweep.Parameter("optim.name", "choice", values=("sgd", "adamw"))),
        ("optim.lr=log:1e-3:1", sweep.Parameter("optim.lr", "log", low=1e-3, high=1.0)),
        ("batch_size=int:32:256", sweep.Parameter("batch_size", "int", low=32, high=256)),
    ],
)
def test_parse_parameter_forms(text, expected):
  assert sweep.parse_parameter(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim.lr", "use KEY=a,b,c"),
        ("optim.lr=log:0:1", "LOW > 0"),
        ("optim.lr=uniform:1:0.5", "LOW must be below HIGH"),
        ("optim.lr=log:a:b", "invalid range"),
        ("optim.lr=0.1,0.1", "repeats a value"),
    ],
)
def test_parse_parameter_errors(text, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_parameter(text)


def test_sweep_definition_errors():
  with pytest.raises(ValueError, match="grid needs listed values"):
    sweep.Sweep(_base(), [sweep.parse_parameter("optim.lr=log:0.01:1")], method="grid")
  with pytest.raises(KeyError, match="optim.learning_rate"):
    sweep.Sweep(_base(), [sweep.parse_parameter("optim.learning_rate=0.1,0.2")])
  with pytest.raises(ValueError, match="unknown sweep method"):
    sweep.Sweep(_base(), [sweep.parse_parameter("optim.lr=0.1,0.2")], method="bayes")
  # Values the trainer would refuse are rejected before any trial runs.
  with pytest.raises(ValueError, match="config.optim.lr must be a number > 0, got -0.1"):
    sweep.Sweep(_base(), [sweep.parse_parameter("optim.lr=0.1,-0.1")])
  with pytest.raises(ValueError, match=r"config.optim.weight_decay must be a number >= 0, got -1"):
    sweep.Sweep(_base(), [sweep.parse_parameter("optim.weight_decay=uniform:-1:1")])


def test_grid_covers_every_combination_once(tmp_path):
  trainer = FakeTrainer()
  study = sweep.run_sweep(_grid(), str(tmp_path), train_fn=trainer)
  assert _finished_params(study) == ALL_PAIRS
  assert len(trainer.calls) == 6
  assert len({workdir for workdir, _, _ in trainer.calls}) == 6
  assert study.best_params == {"optim.lr": 0.4, "optim.weight_decay": 0.001}


def test_interrupted_sweep_resumes_without_repeats(tmp_path):
  first = FakeTrainer(interrupt_call=3)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(_grid(), str(tmp_path), train_fn=first)
  cut_workdir = first.calls[2][0]

  second = FakeTrainer()
  study = sweep.run_sweep(_grid(), str(tmp_path), train_fn=second)
  assert _finished_params(study) == ALL_PAIRS
  # Only the cut trial and the three never started run again.
  assert len(second.calls) == 4
  assert second.calls[0][0] == cut_workdir


def test_signal_as_trial_finishes_stops_sweep(tmp_path):
  first = FakeTrainer(late_signal_call=2)
  with pytest.raises(KeyboardInterrupt, match="as trial 1 finished"):
    sweep.run_sweep(_grid(), str(tmp_path), train_fn=first)
  assert len(first.calls) == 2
  done_first = [w for w, _, _ in first.calls]

  second = FakeTrainer()
  study = sweep.run_sweep(_grid(), str(tmp_path), train_fn=second)
  assert _finished_params(study) == ALL_PAIRS
  # Both finished trials count; only the four never started run.
  assert len(second.calls) == 4
  assert not set(done_first) & {w for w, _, _ in second.calls}


def test_crashed_running_trial_runs_again(tmp_path):
  definition = _grid()
  study, _ = sweep.open_study(definition, str(tmp_path))
  crashed = study.ask()  # Left running, as a killed process leaves it.
  for parameter in definition.parameters:
    parameter.suggest(crashed)
  values = dict(crashed.params)

  trainer = FakeTrainer()
  study = sweep.run_sweep(definition, str(tmp_path), train_fn=trainer)
  assert _finished_params(study) == ALL_PAIRS
  assert (trainer.calls[0][1], trainer.calls[0][2]) == (
      values["optim.lr"],
      values["optim.weight_decay"],
  )


def test_changed_sweep_rejected(tmp_path):
  sweep.run_sweep(_grid(), str(tmp_path), train_fn=FakeTrainer())
  changed = _grid()
  changed.base_config.num_epochs = 5
  with pytest.raises(ValueError, match="differs from this command: the base config"):
    sweep.run_sweep(changed, str(tmp_path), train_fn=FakeTrainer())
  with pytest.raises(ValueError, match='method "grid" there, "random" now'):
    sweep.run_sweep(dataclasses.replace(_grid(), method="random"), str(tmp_path), FakeTrainer())


def test_pruning_stops_worse_trials(tmp_path):
  definition = sweep.Sweep(
      base_config=_base(),
      parameters=[sweep.parse_parameter("optim.lr=0.4,0.2,0.1,0.05,0.025")],
      method="grid",
      num_trials=5,
      prune=True,
  )
  # Accuracy per epoch grows with lr, so later grid points (if worse) fall below the median.
  trainer = FakeTrainer(accuracies_by_epoch=lambda config: [config.optim.lr] * 3)
  study = sweep.run_sweep(definition, str(tmp_path), train_fn=trainer)
  states = {t.params["optim.lr"]: t.state for t in study.trials}
  assert len(states) == 5
  pruned = [lr for lr, state in states.items() if state == optuna.trial.TrialState.PRUNED]
  completed = [lr for lr, state in states.items() if state == optuna.trial.TrialState.COMPLETE]
  assert len(completed) >= 3  # The median needs three finished trials first.
  assert all(lr < max(completed) for lr in pruned)


def test_write_results_lists_every_trial(tmp_path):
  study = sweep.run_sweep(_grid(), str(tmp_path), train_fn=FakeTrainer())
  csv_path, markdown_path, plot_path = sweep.write_results(study, str(tmp_path))
  assert len(open(csv_path).read().strip().splitlines()) == 1 + 6
  assert "| trial | optim.lr | optim.weight_decay |" in open(markdown_path).read()
  assert os.path.getsize(plot_path) > 0


def test_write_results_names_rerun_of_stopped_trial(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(_grid(), str(tmp_path), train_fn=FakeTrainer(interrupt_call=2))
  study = sweep.run_sweep(_grid(), str(tmp_path), train_fn=FakeTrainer())
  _, markdown_path, _ = sweep.write_results(study, str(tmp_path))
  rows = open(markdown_path).read().splitlines()
  assert len(rows) == 2 + 7
  assert "| stopped, rerun as trial 2 |" in rows[2 + 1]
  assert sum("| complete |" in row for row in rows) == 6


def test_on_eval_true_stops_real_run(tmp_path):
  config = digits_resnet.get_config()
  apply_overrides(
      config,
      {
          "model.name": "resnet8",
          "num_epochs": 3,
          "eval_every_epochs": 1,
          "batch_size": 128,
          "eval_batch_size": 120,
      },
  )
  seen = []

  def on_eval(epoch, evaluation):
    seen.append((epoch, evaluation["accuracy"]))
    return epoch == 1

  results = loop.train_and_evaluate(config, str(tmp_path), on_eval=on_eval)
  assert results["interrupted"] == "pruned"
  assert results["steps"] == results["total_steps"] // 3
  assert [epoch for epoch, _ in seen] == [1]
