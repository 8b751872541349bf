"""Tests for the improvement studies: rows, overrides, summaries and the BENCHMARKS.md section."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from jaxbase import checkpoint, models, optim, study, study_tables
from jaxbase.train import config_check, loop
from jaxbase.train import state as train_state


def _base():
  return ml_collections.ConfigDict(
      {"seed": 0, "optim": {"lr": 1e-3, "name": "adam"}, "model": {"plain": True}}
  )


TINY = study.Table(
    name="tiny",
    base_config=_base,
    levers=(
        study.Lever("residual", {"model.plain": False}, ""),
        study.Lever("fast", {"optim.lr": 1e-2}, ""),
        study.Lever("sgd", {"optim.name": "sgd", "optim.lr": 0.1}, ""),
    ),
    combined=("residual", "fast"),
    seeds=2,
)


def test_rows_are_baseline_levers_and_combination():
  rows = TINY.rows()
  assert [name for name, _ in rows] == [
      "baseline",
      "residual",
      "fast",
      "sgd",
      "combined: residual + fast",
  ]
  assert rows[0][1] == {}
  assert rows[-1][1] == {"model.plain": False, "optim.lr": 1e-2}


def test_conflicting_combination_rejected():
  table = study.Table("bad", _base, TINY.levers, combined=("fast", "sgd"))
  with pytest.raises(ValueError, match="both set optim.lr"):
    table.rows()


def test_unknown_combined_lever_rejected():
  table = study.Table("bad", _base, TINY.levers, combined=("residual", "wider"))
  with pytest.raises(ValueError, match="unknown lever 'wider'"):
    table.rows()


def test_apply_overrides_rejects_unknown_keys():
  config = _base()
  with pytest.raises(KeyError, match="optim.learning_rate"):
    study.apply_overrides(config, {"optim.learning_rate": 0.1})
  with pytest.raises(KeyError, match="no section 'optimizer'"):
    study.apply_overrides(config, {"optimizer.lr": 0.1})


def _fake_train(calls):
  def train(config, workdir):
    calls.append((workdir, config.to_dict()))
    accuracy = 0.5 + 0.1 * (not config.model.plain) + 0.01 * config.seed
    return {"eval_accuracy": accuracy, "train_seconds": 2.0, "num_params": 100}

  return train


def test_run_table_runs_every_row_and_seed(tmp_path):
  calls = []
  results = study.run_table(TINY, str(tmp_path), train_fn=_fake_train(calls))
  assert len(calls) == 5 * 2
  workdirs = [workdir for workdir, _ in calls]
  assert os.path.join(str(tmp_path), "residual", "seed_1") in workdirs
  assert len(set(workdirs)) == len(workdirs)
  by_dir = dict(calls)
  assert by_dir[os.path.join(str(tmp_path), "fast", "seed_0")]["optim"]["lr"] == 1e-2
  assert by_dir[os.path.join(str(tmp_path), "baseline", "seed_1")]["seed"] == 1
  assert list(results) == [name for name, _ in TINY.rows()]


def _base_with_init():
  config = _base()
  config.init = ml_collections.ConfigDict({"checkpoint": ""})
  config.data = ml_collections.ConfigDict({"classes": (), "path": ""})
  return config


def _pretraining_config():
  config = _base_with_init()
  config.data.classes = (0, 1)
  return config


TRANSFER = study.Table(
    name="transfer",
    base_config=_base_with_init,
    levers=(
        study.Lever("fine-tune", {"init.checkpoint": study.pretrained("first-half")}, ""),
        study.Lever("fast", {"optim.lr": 1e-2}, ""),
    ),
    combined=(),
    seeds=2,
    pretraining=(study.Pretraining("first-half", _pretraining_config, "classes 0 and 1"),),
)


def test_pretraining_trained_once_first(tmp_path):
  calls = []
  study.run_table(
      TRANSFER,
      str(tmp_path),
      train_fn=_fake_train(calls),
      extra_overrides={"data.path": "/data/x"},
  )
  workdirs = [workdir for workdir, _ in calls]
  pretraining_dir = os.path.join(str(tmp_path), "pretraining", "first-half")
  assert workdirs.count(pretraining_dir) == 1
  # Trained after the baseline and before the first row that starts from it.
  assert workdirs.index(pretraining_dir) == 2
  by_dir = dict(calls)
  assert by_dir[pretraining_dir]["data"] == {"classes": (0, 1), "path": "/data/x"}
  for seed in (0, 1):
    tuned = by_dir[os.path.join(str(tmp_path), "fine-tune", f"seed_{seed}")]
    assert tuned["init"]["checkpoint"] == pretraining_dir
  assert by_dir[os.path.join(str(tmp_path), "fast", "seed_0")]["init"]["checkpoint"] == ""


def test_rows_without_transfer_skip_pretraining(tmp_path):
  calls = []
  study.run_table(TRANSFER, str(tmp_path), seeds=1, only_rows=["fast"], train_fn=_fake_train(calls))
  assert [os.path.basename(os.path.dirname(w)) for w, _ in calls] == ["baseline", "fast"]


def test_unknown_pretraining_name_rejected():
  table = study.Table(
      "bad",
      _base_with_init,
      (study.Lever("tune", {"init.checkpoint": study.pretrained("x")}, ""),),
      (),
  )
  with pytest.raises(ValueError, match="pretraining 'x', which the table does not list"):
    table.rows()


def test_signal_as_run_finishes_stops_table(tmp_path):
  calls = []
  train = _fake_train(calls)

  def train_with_late_signal(config, workdir):
    results = train(config, workdir)
    if len(calls) == 3:
      results["received_signal"] = "SIGINT"  # The run completed; the signal came after.
    return results

  with pytest.raises(KeyboardInterrupt, match="rerun the same command"):
    study.run_table(TINY, str(tmp_path), train_fn=train_with_late_signal)
  assert len(calls) == 3


def test_run_table_only_rows_keeps_baseline(tmp_path):
  calls = []
  results = study.run_table(
      TINY, str(tmp_path), seeds=1, only_rows=["fast"], train_fn=_fake_train(calls)
  )
  assert list(results) == ["baseline", "fast"]
  with pytest.raises(ValueError, match="unknown rows"):
    study.run_table(TINY, str(tmp_path), only_rows=["wider"], train_fn=_fake_train([]))


def test_summary_means_stds_and_deltas(tmp_path):
  results = study.run_table(TINY, str(tmp_path), train_fn=_fake_train([]))
  summaries = {s.name: s for s in study.summarize(results)}
  baseline, residual = summaries["baseline"], summaries["residual"]
  assert baseline.accuracy_mean == pytest.approx(0.505)
  assert baseline.accuracy_std == pytest.approx(0.00707107, rel=1e-5)
  assert baseline.delta == 0.0
  assert residual.delta == pytest.approx(0.1)
  assert residual.robust_mean is None
  table = study.markdown_table(list(summaries.values()))
  assert "| residual | 2 | 60.50 ± 0.71% | +10.00 |" in table


def test_robust_column_uses_robust_fn(tmp_path):
  table = study.Table("tiny", _base, TINY.levers[:1], (), seeds=1, robust_attack=("pgd10", 0.1))
  seen = []

  def robust(workdir, attack, eps, num_examples):
    seen.append((attack, eps, num_examples))
    return 0.25

  results = study.run_table(table, str(tmp_path), train_fn=_fake_train([]), robust_fn=robust)
  summaries = study.summarize(results)
  assert seen == [("pgd10", 0.1, 0)] * 2
  assert summaries[1].robust_delta == 0.0
  assert "robust top-1" in study.markdown_table(summaries)


def test_update_benchmarks_replaces_only_its_section(tmp_path):
  path = str(tmp_path / "BENCHMARKS.md")
  with open(path, "w") as f:
    f.write("# Benchmarks\n\nkept text\n")
  study.update_benchmarks(path, "tiny", "first version")
  study.update_benchmarks(path, "other", "other table")
  study.update_benchmarks(path, "tiny", "second version")
  text = open(path).read()
  assert "kept text" in text
  assert "other table" in text
  assert "second version" in text
  assert "first version" not in text
  assert text.count("<!-- study:tiny:begin -->") == 1


def test_update_benchmarks_rejects_damaged_markers(tmp_path):
  path = str(tmp_path / "BENCHMARKS.md")
  with open(path, "w") as f:
    f.write("intro\n<!-- study:tiny:begin -->\nold\n")
  with pytest.raises(ValueError, match="damaged section"):
    study.update_benchmarks(path, "tiny", "new")
  assert open(path).read() == "intro\n<!-- study:tiny:begin -->\nold\n"


def test_unknown_table_rejected():
  with pytest.raises(ValueError, match="known tables: levers-digits"):
    study_tables.get("levers-mnist")


@pytest.mark.parametrize("table", list(study_tables.TABLES.values()), ids=lambda t: t.name)
def test_every_row_builds_a_valid_model(table):
  configs = [study.row_config(table, overrides, 0, {}) for _, overrides in table.rows()]
  configs += [run.config() for run in table.pretraining]
  for config in configs:
    config_check.check_config(config)
    loop.build_augment(config.augment)
    task = config.get("task", "classification")
    model = models.build_model(config.model, num_classes=10, vocab_size=100, task=task)
    params = jax.eval_shape(
        lambda model=model: train_state.create_train_state(
            model, optax.identity(), _example_inputs(config), 0
        ).params
    )
    optim.build(config.optim, 10, 100, params=params)


def _example_inputs(config):
  if config.model.name.startswith("bert"):
    return {
        "token_ids": jnp.zeros((1, 8), jnp.int32),
        "padding_mask": jnp.ones((1, 8), jnp.int32),
    }
  return jnp.zeros((1, 32, 32, len(config.model.mean)), jnp.float32)


def test_changed_row_config_rejected(tmp_path):
  def base():
    config = study_tables.DIGITS.base_config()
    config.num_epochs = 1
    config.eval_every_epochs = 1
    config.checkpoint.every_epochs = 1
    return config

  first = study.Table("t", base, (), (), seeds=1)
  results = study.run_table(first, str(tmp_path))
  assert 0.0 < results["baseline"][0]["eval_accuracy"] <= 1.0
  again = study.run_table(first, str(tmp_path))
  assert again["baseline"][0] == results["baseline"][0]

  def changed():
    config = base()
    config.optim.lr = 3e-3
    return config

  second = study.Table("t", changed, (), (), seeds=1)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="optim.lr"):
    study.run_table(second, str(tmp_path))


def test_levers_digits_small_variant_end_to_end(tmp_path):
  # The CI-sized variant of the real table: one seed, two epochs, the baseline
  # and one lever, the robust column included, written into a BENCHMARKS file.
  results = study.run_table(
      study_tables.DIGITS,
      str(tmp_path / "study"),
      seeds=1,
      only_rows=["residual"],
      extra_overrides={"num_epochs": 2, "eval_every_epochs": 2, "checkpoint.every_epochs": 2},
  )
  assert list(results) == ["baseline", "residual"]
  summaries = study.summarize(results)
  for summary in summaries:
    assert 0.2 < summary.accuracy_mean <= 1.0
    assert 0.0 <= summary.robust_mean <= summary.accuracy_mean
  assert summaries[1].num_params > summaries[0].num_params  # Shortcut projections.
  path = str(tmp_path / "BENCHMARKS.md")
  study.update_benchmarks(path, "levers-digits", study.markdown_table(summaries))
  assert "| residual | 1 |" in open(path).read()
