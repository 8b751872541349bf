"""scripts/summarize.py: one Markdown row per run from its results.json."""

import importlib.util
import json
import os

import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "summarize.py")


@pytest.fixture(scope="module")
def summarize():
  spec = importlib.util.spec_from_file_location("summarize", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _workdir(tmp_path, **fields):
  results = {
      "model": "resnet20",
      "task": "classification",
      "dataset": "cifar10",
      "epochs": 2,
      "eval_accuracy": 0.5,
      "eval_top5": 0.9,
      "best_eval_accuracy": 0.55,
      "train_seconds": 90.0,
      "devices": 2,
      "eval_examples": 1000,
      "num_classes": 10,
      **fields,
  }
  with open(tmp_path / "results.json", "w") as f:
    json.dump(results, f)
  return str(tmp_path)


def test_row_reports_top5_with_more_than_five_classes(summarize, tmp_path):
  row = summarize.row(_workdir(tmp_path))
  assert row == "| resnet20 | cifar10 | 2 | 50.00% | 90.00% | 55.00% | - | 1.5 min | 2 | 1,000 |"


def test_row_leaves_out_top5_of_a_binary_task(summarize, tmp_path):
  row = summarize.row(_workdir(tmp_path, num_classes=2, eval_top5=1.0))
  assert row.split(" | ")[4] == "-"


def test_row_keeps_top5_of_mlm(summarize, tmp_path):
  row = summarize.row(_workdir(tmp_path, task="mlm", num_classes=2, eval_top5=0.4))
  assert row.split(" | ")[4] == "40.00%"
