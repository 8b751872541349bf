"""Tests for multi-process runs: settings, start-up errors, and two processes against one.

The two-process tests start `scripts/train.py` twice on 127.0.0.1, each
process with 4 CPU devices, and compare the run with one process of 8 devices
(this pytest process, see conftest.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxbase import checkpoint as checkpoint_lib
from jaxbase import distributed
from jaxbase.configs import digits_resnet
from jaxbase.train import train_and_evaluate
from jaxbase.train.loop import evaluate_checkpoint, setup_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "scripts", "train.py")
# A tiny run: ResNet-8 on the 8x8 digits, one epoch of 5 steps at batch 256. The
# learning rate is low so that float rounding differences stay small (see below).
CONFIG_OVERRIDES = {
    "model.name": "resnet8",
    "batch_size": 256,
    "eval_batch_size": 128,
    "num_epochs": 1,
    "log_every_steps": 2,
    # A low rate keeps float rounding from growing over the steps; see below.
    "optim.lr": 0.002,
}


def _free_port():
  # Returns a port that was free a moment ago; these tests bind it only where they say so.
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _config():
  config = digits_resnet.get_config()
  for key, value in CONFIG_OVERRIDES.items():
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _start(workdir, port, devices_per_process, extra_flags=()):
  """Starts one train.py process per entry of `devices_per_process`."""
  flags = [f"--config.{key}={value}" for key, value in CONFIG_OVERRIDES.items()]
  processes = []
  for process_id, devices in enumerate(devices_per_process):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]),
    )
    command = [
        sys.executable,
        TRAIN_SCRIPT,
        f"--config={os.path.join(REPO, 'jaxbase', 'configs', 'digits_resnet.py')}",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={len(devices_per_process)}",
        f"--process_id={process_id}",
        "--init_timeout=120",
        *flags,
        *extra_flags,
    ]
    processes.append(
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    )
  return processes


def _wait(processes):
  """Waits for the processes (killing them after 10 minutes); returns (code, stdout, stderr)s."""
  outputs = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=600)
      outputs.append((process.returncode, stdout, stderr))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return outputs


def _launch(workdir, port, devices_per_process, extra_flags=()):
  """Runs one train.py process per entry of `devices_per_process` to the end."""
  return _wait(_start(workdir, port, devices_per_process, extra_flags))


def _read_state(workdir, step, target=None):
  path = os.path.join(workdir, checkpoint_lib.LATEST_DIR, str(step), "state")
  return ocp.StandardCheckpointer().restore(path, target)


def _max_difference(a, b):
  differences = jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b
  )
  return max(jax.tree.leaves(differences))


def test_two_processes_equal_one_process(tmp_path):
  workdir = str(tmp_path / "two_processes")
  outputs = _launch(workdir, _free_port(), devices_per_process=[4, 4])
  for process_id, (returncode, stdout, stderr) in enumerate(outputs):
    assert returncode == 0, f"process {process_id} failed:\n{stderr[-3000:]}"
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["processes"] == 2
  assert results["devices"] == 8
  steps = results["steps"]
  assert steps == 1437 // 256

  # Process 0 alone prints and writes files: one results line, one metrics record per log step.
  assert "eval_accuracy" in outputs[0][1]
  assert "epoch 1/1" in outputs[0][1]
  assert "eval_accuracy" not in outputs[1][1]
  assert "epoch 1/1" not in outputs[1][1]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4, 5, 5]

  # The same run in one process with 8 devices ends with the same state.
  reference_dir = str(tmp_path / "one_process")
  reference = train_and_evaluate(_config(), reference_dir)
  assert jax.process_count() == 1
  assert reference["steps"] == steps
  one_process = _read_state(reference_dir, steps)
  # A target places the arrays on this process's devices, unlike the two processes' layout.
  two_processes = _read_state(workdir, steps, target=one_process)
  # The all-reduce over processes (gloo) sums in another order than the one inside a
  # process, so the runs differ by float rounding: about 1e-8 in the parameters after
  # these 5 steps at lr 0.002. A larger rate amplifies it, and by how much depends on
  # the CPU: at lr 0.02 it reached 4e-4 on an Intel Xeon but stayed near 1e-7 on an
  # AMD EPYC.
  initial = jax.device_get(setup_run(_config()).state.params)
  moved = _max_difference(one_process["params"], initial)
  for name in ("params", "batch_stats", "opt_state"):
    difference = _max_difference(two_processes[name], one_process[name])
    assert difference < 2e-6, f"{name} differ by up to {difference}"
  assert moved > 0.002  # A thousand times the tolerance.
  np.testing.assert_allclose(results["eval_loss"], reference["eval_loss"], rtol=1e-5)

  # The checkpoint the two processes wrote restores in this single process.
  restored = evaluate_checkpoint(workdir, "latest")
  assert restored["step"] == steps
  assert restored["eval_examples"] == 360
  np.testing.assert_allclose(restored["eval_accuracy"], results["eval_accuracy"], rtol=1e-6)
  np.testing.assert_allclose(restored["eval_loss"], results["eval_loss"], rtol=1e-5)


def _stop_one_process(workdir, process_id, signum, after_step):
  """Runs two processes until process 0 logs a step past `after_step`, then signals one.

  Returns the step both stopped at, after checking that they agree on it, and
  the processes' outputs.
  """
  # A long run (100 epochs of 22 steps) at batch 64, so that it does not end before the signal.
  long_run = ["--config.batch_size=64", "--config.num_epochs=100"]
  processes = _start(workdir, _free_port(), [4, 4], long_run)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and all(p.poll() is None for p in processes):
    if os.path.exists(metrics):
      with open(metrics) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
      if steps and steps[-1] > after_step:
        break
    time.sleep(0.2)
  processes[process_id].send_signal(signum)
  outputs = _wait(processes)

  # Both save the same log step (every 2 steps) and exit with the signal's status.
  name = signal.Signals(signum).name
  for index, (returncode, _, stderr) in enumerate(outputs):
    assert returncode == (143 if name == "SIGTERM" else 130), f"{index}:\n{stderr[-3000:]}"
  other = 1 - process_id
  assert f"Process {process_id} received {name}" in outputs[other][2]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["interrupted"] == name
  stopped = results["steps"]
  assert after_step < stopped < results["total_steps"]
  assert stopped % 2 == 0
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == stopped
  checkpointer.close()
  return stopped, outputs


def test_signal_to_one_process_stops_all(tmp_path):
  workdir = str(tmp_path / "stopped")
  first, _ = _stop_one_process(workdir, 1, signal.SIGTERM, after_step=0)
  # The same command resumes from that step on both processes; Ctrl-C to the other
  # process stops both again.
  second, outputs = _stop_one_process(workdir, 0, signal.SIGINT, after_step=first)
  assert f"Resuming at step {first} of 2200" in outputs[0][2]
  assert second > first


def test_unequal_devices_per_process_rejected(tmp_path):
  workdir = tmp_path / "unequal"
  outputs = _launch(str(workdir), _free_port(), devices_per_process=[4, 2])
  for returncode, _, stderr in outputs:
    assert returncode != 0
    assert "give every process the same number of devices" in stderr
  assert not (workdir / "checkpoints").exists()


def test_unreachable_coordinator_times_out():
  address = f"127.0.0.1:{_free_port()}"
  settings = distributed.resolve(
      coordinator_address=address, num_processes=2, process_id=1, timeout_seconds=2
  )
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=f"waiting for the coordinator at {address}"):
    distributed.initialize(settings)
  assert 2 <= time.monotonic() - start < 30


def test_coordinator_port_in_use_rejected():
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    settings = distributed.resolve(
        coordinator_address=address, num_processes=2, process_id=0, timeout_seconds=2
    )
    with pytest.raises(
        OSError, match=f"cannot run the coordinator at {address}: port .* is in use"
    ):
      distributed.initialize(settings)


def test_expected_device_count_checked():
  distributed.check_devices(8)
  distributed.check_devices(None)
  with pytest.raises(ValueError, match="found 8 devices .* but the run expects 16"):
    distributed.check_devices(16)


def test_resolve_reads_environment():
  environ = {
      distributed.ENV_COORDINATOR_ADDRESS: "10.0.0.2:8476",
      distributed.ENV_NUM_PROCESSES: "4",
      distributed.ENV_PROCESS_ID: "3",
      distributed.ENV_INIT_TIMEOUT: "60",
  }
  settings = distributed.resolve(environ=environ)
  assert settings == distributed.Settings("explicit", "10.0.0.2:8476", 4, 3, 60)
  # Arguments override the environment.
  settings = distributed.resolve(process_id=1, timeout_seconds=5, environ=environ)
  assert settings.process_id == 1
  assert settings.timeout_seconds == 5


def test_resolve_modes():
  assert distributed.resolve(environ={}).mode == "off"
  assert distributed.resolve(auto=True, environ={}).mode == "auto"
  assert distributed.resolve(environ={distributed.ENV_DISTRIBUTED: "auto"}).mode == "auto"
  assert distributed.resolve(environ={}).timeout_seconds == distributed.DEFAULT_TIMEOUT_SECONDS


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"coordinator_address": "10.0.0.2:8476", "num_processes": 2}, "needs the process count"),
        ({"coordinator_address": "10.0.0.2", "num_processes": 2, "process_id": 0}, "host:port"),
        (
            {"coordinator_address": "10.0.0.2:8476", "num_processes": 2, "process_id": 2},
            "process id 2 is out of range for 2 processes",
        ),
        ({"num_processes": 2, "process_id": 0}, "without a coordinator address"),
        ({"timeout_seconds": 0}, "timeout must be positive"),
        ({"environ": {distributed.ENV_NUM_PROCESSES: "two"}}, "must be an integer, got 'two'"),
    ],
)
def test_resolve_rejects_bad_settings(arguments, message):
  arguments.setdefault("environ", {})
  with pytest.raises(ValueError, match=message):
    distributed.resolve(**arguments)
