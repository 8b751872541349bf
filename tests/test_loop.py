"""End-to-end tests of train_and_evaluate on the embedded digits data."""

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import crash_driver
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxbase import checkpoint as checkpoint_lib
from jaxbase.configs import digits_resnet
from jaxbase.train import loop
from jaxbase.train import nonfinite
from jaxbase.train import steps as steps_lib
from jaxbase.train import train_and_evaluate
from jaxbase.train.loop import StopRequest, evaluate_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  config = digits_resnet.get_config()
  config.model.name = "resnet8"
  config.num_epochs = 2
  config.batch_size = 64
  config.eval_batch_size = 64
  config.eval_every_epochs = 1
  config.log_every_steps = 5
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _read_state(workdir, step):
  path = os.path.join(workdir, checkpoint_lib.LATEST_DIR, str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def _checkpoint_steps(workdir):
  return sorted(
      int(name)
      for name in os.listdir(os.path.join(workdir, checkpoint_lib.LATEST_DIR))
      if name.isdigit()
  )


def test_run_writes_outputs_and_learns(tmp_path):
  workdir = str(tmp_path / "run")
  results = train_and_evaluate(_config(), workdir)
  assert results["eval_examples"] == 360
  assert results["steps"] == 2 * (1437 // 64)
  assert results["eval_accuracy"] > 0.3  # Chance is 0.1; two short epochs are enough to beat it.
  for name in ("results.json", "config.json", "metrics.jsonl", "curves.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["eval_accuracy"] == results["eval_accuracy"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("eval/accuracy" in r for r in records)
  assert any("train/learning_rate" in r for r in records)

  # The saved final checkpoint reproduces the final evaluation.
  latest = evaluate_checkpoint(workdir, "latest")
  assert latest["step"] == results["steps"]
  assert latest["eval_examples"] == 360
  np.testing.assert_allclose(latest["eval_accuracy"], results["eval_accuracy"], rtol=1e-6)
  best = evaluate_checkpoint(workdir, "best")
  assert best["step"] == results["best_step"]
  np.testing.assert_allclose(best["eval_accuracy"], results["best_eval_accuracy"], rtol=1e-6)


def test_evaluate_without_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="no latest checkpoint"):
    evaluate_checkpoint(str(tmp_path), "latest")


def test_resume_mid_epoch_is_bitwise_equal(tmp_path):
  uninterrupted, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  config = _config(**{"checkpoint.every_steps": 7, "checkpoint.keep": 20})
  train_and_evaluate(config, uninterrupted)
  train_and_evaluate(config, resumed)

  # Keep only the mid-epoch checkpoint of step 7 in the second run, as if it had stopped there.
  final_step = _checkpoint_steps(uninterrupted)[-1]
  for step in _checkpoint_steps(resumed):
    if step != 7:
      shutil.rmtree(os.path.join(resumed, checkpoint_lib.LATEST_DIR, str(step)))
  os.remove(os.path.join(resumed, "results.json"))
  results = train_and_evaluate(config, resumed)

  assert results["steps"] == final_step
  expected, actual = _read_state(uninterrupted, final_step), _read_state(resumed, final_step)
  jax.tree.map(np.testing.assert_array_equal, expected, actual)


def _snapshot(workdir):
  """Maps every file under workdir to its bytes."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A one-epoch run with checkpoints at steps 10, 20 and 22 (the end)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  config = _config(num_epochs=1, **{"checkpoint.every_steps": 10})
  results = train_and_evaluate(config, workdir)
  return workdir, config, results


def test_resnet_fine_tune_from_checkpoint(finished_run, tmp_path):
  # Fine-tuning on three other digit classes: every backbone parameter and
  # BatchNorm statistic starts as the checkpoint's, and the head has the new
  # class count. With the backbone frozen the parameters stay bitwise equal.
  from jaxbase import transfer
  from jaxbase.train.loop import setup_run

  pretrained_dir, _, _ = finished_run
  config = _config(
      num_epochs=1,
      **{
          "init.checkpoint": pretrained_dir,
          "data.classes": (7, 8, 9),
          "optim.freeze_backbone": True,
          "optim.weight_decay": 5e-4,
      },
  )
  pretrained, _ = transfer.restore_variables(pretrained_dir)
  run = setup_run(config, str(tmp_path / "setup"), load_pretrained=True)
  start = jax.device_get(run.launcher.unreplicate(run.state))
  assert start.params["head"]["kernel"].shape[-1] == 3
  assert pretrained["params"]["head"]["kernel"].shape[-1] == 10
  for name, subtree in pretrained["params"].items():
    if name != "head":
      jax.tree.map(np.testing.assert_array_equal, start.params[name], subtree)
  assert pretrained["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, start.batch_stats, pretrained["batch_stats"])

  workdir = str(tmp_path / "probe")
  results = train_and_evaluate(config, workdir)
  tuned, _ = transfer.restore_variables(workdir)
  assert results["steps"] > 0
  for name, subtree in pretrained["params"].items():
    if name != "head":
      jax.tree.map(np.testing.assert_array_equal, tuned["params"][name], subtree)
  assert not np.array_equal(tuned["params"]["head"]["kernel"], start.params["head"]["kernel"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "resnet20"}, "model.name: 'resnet8' in the checkpoint, 'resnet20' now"),
        ({"num_epochs": 3}, "num_epochs: 1 in the checkpoint, 3 now"),
        ({"batch_size": 32}, "batch_size: 64 in the checkpoint, 32 now"),
        ({"optim.lr": 0.5}, "optim.lr: 0.1 in the checkpoint, 0.5 now"),
    ],
)
def test_resume_with_other_config_rejected_and_kept(finished_run, tmp_path, overrides, message):
  source, config, _ = finished_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)
  before = _snapshot(workdir)
  changed = _config(**{"num_epochs": 1, "checkpoint.every_steps": 10, **overrides})
  with pytest.raises(
      checkpoint_lib.CheckpointMismatchError, match="written by model 'resnet8'"
  ) as info:
    train_and_evaluate(changed, workdir)
  assert message in str(info.value)
  assert _snapshot(workdir) == before


def test_rerun_of_finished_run_changes_nothing(finished_run, tmp_path):
  source, config, results = finished_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)
  before = _snapshot(workdir)
  # Logging settings may differ on a rerun.
  config = _config(num_epochs=1, log_every_steps=3, **{"checkpoint.every_steps": 10})
  assert train_and_evaluate(config, workdir) == results
  assert _snapshot(workdir) == before


def test_damaged_latest_checkpoint_falls_back(finished_run, tmp_path, caplog):
  source, config, results = finished_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)
  os.remove(os.path.join(workdir, "results.json"))
  state_dir = os.path.join(workdir, checkpoint_lib.LATEST_DIR, "22", "state")
  for root, _, names in os.walk(state_dir):
    for name in names:
      if not name.startswith("_"):  # Keep orbax's metadata files, damage the array data.
        open(os.path.join(root, name), "wb").close()

  with caplog.at_level(logging.INFO):
    resumed = train_and_evaluate(config, workdir)

  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(
      "failed to read the checkpoint of step 22" in w and "trying the previous checkpoint" in w
      for w in warnings
  ), warnings
  assert any("Resuming at step 20 of 22" in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(workdir, checkpoint_lib.DAMAGED_DIR))[0].startswith(
      "checkpoints-22-"
  )
  # Steps 21 and 22 were trained again and reach the same state as before.
  assert resumed["eval_accuracy"] == results["eval_accuracy"]
  jax.tree.map(np.testing.assert_array_equal, _read_state(source, 22), _read_state(workdir, 22))


def _poison_step(monkeypatch, bad_step):
  """Makes the images of step `bad_step` (counted from 1) NaN, so its loss and gradients are NaN."""
  make_train_step = steps_lib.make_train_step

  def make_poisoned(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def poisoned(state, batch):
      scale = jnp.where(state.step == bad_step - 1, jnp.nan, 1.0)
      images = steps_lib.to_float_images(batch["images"]) * scale
      return train_step(state, {**batch, "images": images})

    return poisoned

  monkeypatch.setattr(steps_lib, "make_train_step", make_poisoned)


def test_nan_loss_stops_at_step_then_skip_resumes(finished_run, tmp_path, monkeypatch, caplog):
  source, _, _ = finished_run
  workdir = str(tmp_path / "run")
  _poison_step(monkeypatch, 13)
  # Checkpoints every 5 steps, logs every 20: the bad step 13 is found at the save of step 15.
  config = _config(num_epochs=1, log_every_steps=20, **{"checkpoint.every_steps": 5})
  with pytest.raises(nonfinite.NonFiniteError) as info:
    train_and_evaluate(config, workdir)
  message = str(info.value)
  assert "step 13 (epoch 1, batch 13 of 22) produced a non-finite loss" in message
  assert "The latest checkpoint, step 10" in message
  assert _checkpoint_steps(workdir) == [5, 10]
  # The last good checkpoint is the state of step 10 of the same run without the NaN.
  jax.tree.map(np.testing.assert_array_equal, _read_state(source, 10), _read_state(workdir, 10))

  # Resuming with on_nonfinite=skip drops the bad step's update and counts it.
  config.on_nonfinite = "skip"
  with caplog.at_level(logging.WARNING):
    results = train_and_evaluate(config, workdir)
  assert results["steps"] == 22
  assert results["skipped_steps"] == 1
  assert any("Skipped step 13 (epoch 1, batch 13 of 22)" in r.getMessage() for r in caplog.records)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_records = [r for r in records if "train/skipped_steps" in r]
  assert train_records[-1]["step"] == 22
  assert train_records[-1]["train/skipped_steps"] == 1
  final = _read_state(workdir, 22)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final["params"]))
  # Step 13 changed nothing but the step counter, so the run differs from the clean one.
  assert not np.array_equal(
      jax.tree.leaves(final["params"])[0], jax.tree.leaves(_read_state(source, 22)["params"])[0]
  )


def test_sigkill_at_several_moments_resumes_exactly(tmp_path):
  """Kills a training process between steps, during a commit and mid-save, then finishes it."""
  workdir = str(tmp_path / "killed")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  # (fault, the step the next start must resume from): checkpoints fall every 4 steps.
  faults = [("step:7", 4), ("commit:12", 8), ("inflight:16", None)]
  expected_resume = None
  for fault, next_resume in faults:
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "crash_driver.py"), workdir, fault],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == -signal.SIGKILL, output
    if expected_resume is not None:
      assert f"Resuming at step {expected_resume} of 22" in output, output
    complete = _checkpoint_steps(workdir)
    if next_resume is None:
      # The save of step 16 was in flight: either it finished or step 12 is the newest.
      assert complete[-1] in (12, 16), complete
      next_resume = complete[-1]
    assert complete[-1] == next_resume, (fault, complete)
    expected_resume = next_resume

  # The last start runs in this process and finishes the run.
  config = crash_driver.config()
  results = train_and_evaluate(config, workdir)
  assert results["steps"] == 22
  leftovers = [
      name
      for name in os.listdir(os.path.join(workdir, checkpoint_lib.LATEST_DIR))
      if not name.isdigit()
  ]
  assert "tmp" not in " ".join(leftovers), leftovers

  uninterrupted = str(tmp_path / "uninterrupted")
  expected = train_and_evaluate(config, uninterrupted)
  assert results["eval_accuracy"] == expected["eval_accuracy"]
  jax.tree.map(
      np.testing.assert_array_equal, _read_state(uninterrupted, 22), _read_state(workdir, 22)
  )


def test_evaluate_override_unknown_key_raises(finished_run):
  workdir, _, _ = finished_run
  with pytest.raises(KeyError, match="unknown config key 'data.pth'"):
    evaluate_checkpoint(workdir, "latest", {"data.pth": "/x"})


def test_evaluate_override_converts_type(finished_run):
  workdir, _, results = finished_run
  evaluation = evaluate_checkpoint(workdir, "latest", {"eval_batch_size": "8"})
  assert evaluation["eval_examples"] == 360
  np.testing.assert_allclose(evaluation["eval_accuracy"], results["eval_accuracy"], rtol=1e-6)


def test_evaluate_with_eval_flip_override(finished_run):
  workdir, _, results = finished_run
  flipped = evaluate_checkpoint(workdir, "latest", {"eval_flip": "true"})
  assert flipped["eval_examples"] == results["eval_examples"] == 360
  # Digits are not mirror-symmetric, so averaging with mirror images changes the loss.
  assert not np.isclose(flipped["eval_loss"], results["eval_loss"], rtol=1e-4)


def test_override_adds_newer_config_key():
  saved = digits_resnet.get_config().to_dict()
  del saved["eval_flip"]  # A run saved before the option existed.
  config = ml_collections.ConfigDict(saved)
  loop._override(config, "eval_flip", "true", "/runs/old")
  assert config.eval_flip is True
  with pytest.raises(KeyError, match="unknown config key 'eval_flips'"):
    loop._override(config, "eval_flips", "true", "/runs/old")
  with pytest.raises(KeyError, match="unknown config key 'optim.eval_flip'"):
    loop._override(config, "optim.eval_flip", "true", "/runs/old")


def test_second_signal_does_not_interrupt_the_save():
  stop = StopRequest()
  stop._handle(signal.SIGTERM, None)
  stop._handle(signal.SIGINT, None)  # Must neither raise nor replace the first signal.
  assert stop.signal_name == "SIGTERM"


def test_signal_after_last_step_completes_run(tmp_path):
  workdir = str(tmp_path / "run")
  epochs_seen = []

  def signal_at_final_eval(epoch, evaluation):
    epochs_seen.append(epoch)
    if epoch == 2:  # After the last step, as a Ctrl-C during the final evaluation.
      os.kill(os.getpid(), signal.SIGINT)
    return False

  results = train_and_evaluate(_config(num_epochs=2), workdir, on_eval=signal_at_final_eval)
  assert epochs_seen == [1, 2]
  assert "interrupted" not in results
  assert results["steps"] == 2 * (1437 // 64)
  assert results["received_signal"] == "SIGINT"
  with open(os.path.join(workdir, "results.json")) as f:
    assert "received_signal" not in json.load(f)


def test_workdir_that_is_a_file_raises(tmp_path):
  path = tmp_path / "file"
  path.write_text("")
  with pytest.raises(NotADirectoryError, match="is a file"):
    train_and_evaluate(_config(), str(path))


def test_sigterm_saves_and_next_run_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  command = [
      sys.executable,
      os.path.join(REPO, "scripts", "train.py"),
      "--config",
      os.path.join(REPO, "jaxbase", "configs", "digits_resnet.py"),
      "--workdir",
      workdir,
      "--config.model.name=resnet8",
      "--config.num_epochs=4",
      "--config.log_every_steps=1",
      "--config.checkpoint.every_epochs=100",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
    assert process.poll() is None, process.stdout.read().decode()
    assert time.time() < deadline, "training did not start within 240 s"
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0].decode()
  assert process.returncode == 143, output
  stopped_at = _checkpoint_steps(workdir)
  total_steps = 4 * (1437 // 64)
  assert len(stopped_at) == 1, output
  assert 0 < stopped_at[0] < total_steps, output

  finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert finished.returncode == 0, finished.stdout + finished.stderr
  assert f"Resuming at step {stopped_at[0]}" in finished.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == total_steps


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"model.name": "resnet21"}, ValueError, "unknown model 'resnet21'"),
        ({"data.source": "imagenet_folder"}, ValueError, "unknown data source 'imagenet_folder'"),
        ({"batch_size": 100}, ValueError, "batch_size=100 is not divisible by the 8 devices"),
        ({"eval_batch_size": 12}, ValueError, "eval_batch_size=12 is not divisible"),
        ({"batch_size": 4096}, ValueError, "4096"),
        ({"num_epochs": 0}, ValueError, "config.num_epochs must be an integer >= 1, got 0"),
        ({"optim.lr": -1.0}, ValueError, "config.optim.lr must be a number > 0, got -1.0"),
        ({"checkpoint.keep": 0}, ValueError, "config.checkpoint.keep must be an integer >= 1"),
        ({"parallel": "dp"}, ValueError, "unknown parallel mode 'dp'"),
        ({"augment.token_dropout": 0.1}, ValueError, "token_dropout=0.1 applies to text"),
        ({"model.mean": (0.5, 0.5, 0.5), "model.std": (0.2, 0.2, 0.2)}, ValueError, "channel"),
    ],
)
def test_bad_config_raises_before_training(tmp_path, overrides, error, message):
  workdir = tmp_path / "run"
  with pytest.raises(error, match=message):
    train_and_evaluate(_config(**overrides), str(workdir))
  assert not (workdir / "checkpoints").exists()


def test_script_reports_input_error_without_traceback(tmp_path):
  command = [
      sys.executable,
      os.path.join(REPO, "scripts", "train.py"),
      "--config",
      os.path.join(REPO, "jaxbase", "configs", "digits_resnet.py"),
      "--workdir",
      str(tmp_path / "run"),
      "--config.num_epochs=0",
  ]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert finished.returncode == 1, finished.stderr
  assert "config.num_epochs must be an integer >= 1, got 0" in finished.stderr
  assert "Traceback" not in finished.stderr


@pytest.mark.parametrize(
    "script, arguments, message",
    [
        ("evaluate.py", ["--workdir", "{tmp}/nowhere"], "work directory {tmp}/nowhere does not"),
        (
            "evaluate.py",
            ["--workdir", "{tmp}/nowhere", "--attacks", "pgd20", "--num_examples", "-1"],
            "--num_examples must be >= 0 (0 attacks every test image), got -1",
        ),
        (
            "train.py",
            ["--config", "{config}", "--workdir", "{tmp}/run", "--config.augment.token_drop=0.1"],
            "the config has no key 'token_drop' (check the --config.KEY=VALUE overrides). "
            'Did you mean "token_dropout"',
        ),
        (
            "train.py",
            ["--config", "{tmp}/nope.py", "--workdir", "{tmp}/run"],
            "the config file {tmp}/nope.py does not exist",
        ),
        (
            "train.py",
            [
                "--config",
                "{config}",
                "--workdir",
                "{tmp}/run",
                "--config.num_epochs=1",
                "--config.optim.lr=abc",
            ],
            "flag --config.optim.lr=abc: could not convert string to float: 'abc'",
        ),
        (
            "sweep.py",
            ["--config", "{config}", "--sweep_dir", "{tmp}/sweep", "--param", "optim.lr=-1,2"],
            "config.optim.lr must be a number > 0, got -1.0",
        ),
    ],
)
def test_other_scripts_report_input_errors_without_traceback(tmp_path, script, arguments, message):
  config = os.path.join(REPO, "jaxbase", "configs", "digits_resnet.py")
  command = [sys.executable, os.path.join(REPO, "scripts", script)] + [
      argument.format(tmp=tmp_path, config=config) for argument in arguments
  ]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert finished.returncode == 1, finished.stderr
  assert message.format(tmp=tmp_path) in finished.stderr
  assert "Traceback" not in finished.stderr


# Text runs: a tiny sentiment data set written as TSV files.
_POSITIVE = ("good", "great", "fine", "lovely", "witty")
_NEGATIVE = ("bad", "dull", "awful", "boring", "worse")
_NOUNS = ("film", "movie", "story", "cast")


def _write_sentiment_tsv(folder):
  """Write train.tsv (80 sentences) and dev.tsv (20) whose label is the adjective's polarity."""
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  for split, count in (("train", 80), ("dev", 20)):
    lines = ["label\tsentence"]
    for _ in range(count):
      label = int(rng.integers(0, 2))
      adjective = rng.choice(_POSITIVE if label else _NEGATIVE)
      noun = rng.choice(_NOUNS)
      lines.append(f"{label}\ta {adjective} {noun} , really {adjective}")
    (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return folder


def _text_config(config, data_path, **overrides):
  config.model.name = "bert_tiny"
  config.model.max_length = 12
  config.data.path = str(data_path)
  config.tokenizer.vocab_size = 120
  config.tokenizer.min_frequency = 1
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 2
  config.optim.warmup_epochs = 0.5
  config.log_every_steps = 5
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory):
  return _write_sentiment_tsv(tmp_path_factory.mktemp("sentiment") / "sst")


@pytest.fixture(scope="module")
def pretrained_mlm(sentiment_data, tmp_path_factory):
  """A two-epoch MLM pretraining run on the tiny training sentences."""
  from jaxbase.configs import sst2_bert_mlm

  workdir = str(tmp_path_factory.mktemp("mlm") / "run")
  results = train_and_evaluate(_text_config(sst2_bert_mlm.get_config(), sentiment_data), workdir)
  return workdir, results


def test_eval_flip_rejected_for_text_model():
  from jaxbase.configs import sst2_bert

  config = sst2_bert.get_config()
  config.eval_flip = True
  with pytest.raises(ValueError, match="eval_flip=True .* is a text model; set eval_flip=False"):
    loop.setup_run(config)


def test_text_classifier_run_and_evaluate(sentiment_data, tmp_path):
  from jaxbase.configs import sst2_bert

  workdir = str(tmp_path / "run")
  results = train_and_evaluate(_text_config(sst2_bert.get_config(), sentiment_data), workdir)
  assert results["task"] == "classification"
  assert results["eval_examples"] == 20
  assert results["steps"] == 2 * (80 // 16)

  # The tokenizer is in the work directory and in the checkpoint metadata.
  with open(os.path.join(workdir, "tokenizer.json")) as f:
    tokenizer_json = f.read()
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  meta = checkpointer.restore_meta(results["steps"])
  checkpointer.close()
  assert json.loads(meta["tokenizer"]) == json.loads(tokenizer_json)

  # Evaluating the checkpoint reads that tokenizer, even if the file changed.
  with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
    f.write("{}")
  latest = evaluate_checkpoint(workdir, "latest")
  np.testing.assert_allclose(latest["eval_accuracy"], results["eval_accuracy"], rtol=1e-6)
  np.testing.assert_allclose(latest["eval_loss"], results["eval_loss"], rtol=1e-5)


def test_trimmed_text_batches_train_like_full_width(sentiment_data, tmp_path):
  # Cutting batches to their longest sentence drops padding columns only; with
  # dropout off (its masks depend on the shape) training follows the same path.
  from jaxbase.configs import sst2_bert

  results = {}
  for multiple in (0, 4):
    config = _text_config(
        sst2_bert.get_config(),
        sentiment_data,
        **{
            "model.dropout_rate": 0.0,
            "model.attention_dropout_rate": 0.0,
            "data.length_multiple": multiple,
            "data.sort_window": 0,
        },
    )
    results[multiple] = train_and_evaluate(config, str(tmp_path / f"multiple_{multiple}"))
  np.testing.assert_allclose(results[4]["eval_loss"], results[0]["eval_loss"], rtol=1e-4)
  steps = results[0]["steps"]
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
      _read_state(str(tmp_path / "multiple_4"), steps)["params"],
      _read_state(str(tmp_path / "multiple_0"), steps)["params"],
  )


def test_mlm_pretraining_run(pretrained_mlm):
  workdir, results = pretrained_mlm
  assert results["task"] == "mlm"
  # Masked-token accuracy over the dev sentences, masked once with a fixed key.
  assert 0 <= results["eval_accuracy"] <= 1
  assert results["eval_examples"] > 0
  assert results["eval_loss"] < np.log(120) + 0.5
  latest = evaluate_checkpoint(workdir, "latest")
  assert latest["eval_examples"] == results["eval_examples"]
  np.testing.assert_allclose(latest["eval_accuracy"], results["eval_accuracy"], rtol=1e-6)


def test_linear_probe_from_pretrained_keeps_backbone(sentiment_data, pretrained_mlm, tmp_path):
  from jaxbase import transfer
  from jaxbase.configs import sst2_bert_finetune

  pretrained_dir, _ = pretrained_mlm
  config = _text_config(
      sst2_bert_finetune.get_config(),
      sentiment_data,
      **{
          "init.checkpoint": pretrained_dir,
          "data.num_train_examples": 32,
          "optim.freeze_backbone": True,
          # A moving average starts as a copy of the pretrained weights; sharing
          # their buffers once crashed XLA when the step donated them.
          "ema.decay": 0.99,
          "eval_every_epochs": 1,
          "log_every_steps": 1,
      },
  )
  workdir = str(tmp_path / "probe")
  results = train_and_evaluate(config, workdir)
  assert results["steps"] == 2 * (32 // 16)

  pretrained, pretrained_meta = transfer.restore_params(pretrained_dir)
  tuned, tuned_meta = transfer.restore_params(workdir)
  assert tuned_meta["tokenizer"] == pretrained_meta["tokenizer"]
  for name in ("embeddings", "encoder"):
    jax.tree.map(np.testing.assert_array_equal, tuned[name], pretrained[name])
  assert "mlm_transform" not in tuned
  assert set(tuned["head"]) == {"kernel", "bias"}


def test_finetune_from_mismatched_model_names_parameters(sentiment_data, pretrained_mlm, tmp_path):
  from jaxbase.configs import sst2_bert_finetune

  pretrained_dir, _ = pretrained_mlm
  config = _text_config(
      sst2_bert_finetune.get_config(),
      sentiment_data,
      **{
          "init.checkpoint": pretrained_dir,
          "model.name": "bert_mini",
          "data.num_train_examples": 32,
      },
  )
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as error:
    train_and_evaluate(config, str(tmp_path / "mini"))
  assert "embeddings/token_embed/embedding" in str(error.value)
  assert "encoder/block_2/" in str(error.value)
