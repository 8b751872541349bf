"""scripts/benchmark.py reports each round of steps and the medians over them."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def _run(tmp_path, *flags):
  output = tmp_path / "bench.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  subprocess.run(
      [sys.executable, str(_SCRIPT), "--model=cnn_small", "--image_shape=8,8,1", "--batch_size=4",
       "--steps=2", "--warmup=0", f"--output={output}", *flags],
      check=True, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  return json.loads(output.read_text())


def test_rounds_report_medians_and_kernels(tmp_path):
  result = _run(tmp_path, "--repeats=3", "--conv_impl=xla")
  rounds = result["rounds"]
  assert len(rounds) == 3
  assert rounds[0]["jax_images_per_second"] == result["train_clean"]["images_per_second"]
  rates = [entry["jax_images_per_second"] for entry in rounds]
  assert result["rounds_median"]["jax_images_per_second"] == statistics.median(rates)
  assert result["conv_kernels"] == "xla"
  assert result["devices"] == 2


def test_bad_repeats_is_a_usage_error(tmp_path):
  completed = subprocess.run(
      [sys.executable, str(_SCRIPT), "--repeats=0"], capture_output=True, text=True, timeout=300
  )
  assert completed.returncode != 0
  assert "--repeats=0 must be at least 1" in completed.stderr


def test_model_flops_and_utilization(tmp_path):
  result = _run(tmp_path, "--peak_tflops=0.5")
  clean = result["train_clean"]
  assert result["model_train_flops_per_image"] > 0
  achieved = result["model_train_flops_per_image"] * clean["images_per_second"] / 1e12
  assert clean["model_tflops_per_second"] == achieved
  assert clean["model_flop_utilization"] == achieved / (0.5 * 2)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--peak_tflops=-1", "--peak_tflops=-1.0 must be a positive finite number"),
        ("--peak_tflops=nan", "--peak_tflops=nan must be a positive finite number"),
        ("--steps=0", "--steps=0 must be at least 1"),
    ],
)
def test_bad_flag_is_a_usage_error(flag, message):
  completed = subprocess.run(
      [sys.executable, str(_SCRIPT), flag], capture_output=True, text=True, timeout=300
  )
  assert completed.returncode != 0
  assert message in completed.stderr
