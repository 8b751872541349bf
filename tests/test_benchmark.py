"""scripts/benchmark.py reports each repeat and the medians over them."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

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


def test_repeats_report_medians_and_kernels(tmp_path):
  result = _run(tmp_path, "--repeats=3", "--conv_impl=xla")
  assert result["repeats"] == 3
  assert len(result["runs"]) == 3
  rates = [run["train_clean"]["images_per_second"] for run in result["runs"]]
  assert result["jax_images_per_second"] == rates
  assert result["jax_images_per_second_median"] == statistics.median(rates)
  for run in result["runs"]:
    assert run["conv_kernels"] == "xla"
    assert run["devices"] == 2
    assert run["malloc_keeps_freed_memory"] is True or sys.platform != "linux"


def test_bad_repeats_is_a_usage_error(tmp_path):
  completed = subprocess.run(
      [sys.executable, str(_SCRIPT), "--repeats=0"], capture_output=True, text=True, timeout=300
  )
  assert completed.returncode != 0
  assert "--repeats=0 must be at least 1" in completed.stderr
