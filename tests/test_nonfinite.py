"""Tests for the non-finite guard of the train step and its host-side monitor."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbase.train import nonfinite
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state


class _TinyNet(nn.Module):

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(2, (3, 3), use_bias=False)(images)
    x = nn.BatchNorm(use_running_average=not train, axis_name="data", momentum=0.9)(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _batch(nan_row=None):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (16, 5, 5, 1)).astype(np.float32)
  if nan_row is not None:
    images[nan_row, 2, 2, 0] = np.nan
  return {"images": images, "labels": rng.integers(0, 3, 16).astype(np.int32)}


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_nonfinite_step_keeps_state(mode):
  launcher = DataParallel(mode)
  model = _TinyNet()
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = create_train_state(model, optimizer, jnp.zeros((1, 5, 5, 1)), seed=0)
  initial = jax.device_get(state)  # A host copy: the step donates the device arrays.
  train_step = launcher.compile_train_step(steps_lib.make_train_step(model, optimizer))
  state = launcher.replicate(state)

  # One NaN pixel in the slice of one replica (row 13 is on device 6 of 8).
  state, metrics = train_step(state, launcher.shard_batch(_batch(nan_row=13)))
  after = jax.device_get(launcher.unreplicate(state))
  flags = np.asarray(jax.device_get(metrics[nonfinite.FLAGS_KEY]))
  names = nonfinite.flag_names(initial.params)
  assert int(after.step) == 1
  assert flags.shape == (len(names),)
  assert flags[0], "the loss is non-finite"
  assert flags[1:].any(), "some gradient is non-finite"
  for unchanged, old in ((after.params, initial.params), (after.batch_stats, initial.batch_stats)):
    jax.tree.map(np.testing.assert_array_equal, unchanged, old)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, initial.opt_state)

  # A clean batch afterwards updates the state as usual.
  state, metrics = train_step(state, launcher.shard_batch(_batch()))
  after_clean = jax.device_get(launcher.unreplicate(state))
  assert not np.asarray(jax.device_get(metrics[nonfinite.FLAGS_KEY])).any()
  assert int(after_clean.step) == 2
  assert not np.array_equal(
      after_clean.params["Dense_0"]["kernel"], after.params["Dense_0"]["kernel"]
  )


def test_flag_names_follow_gradient_leaves():
  params = {"b": {"kernel": jnp.ones(2)}, "a": {"bias": jnp.ones(1), "kernel": jnp.ones(3)}}
  grads = jax.tree.map(lambda x: x, params)
  grads["a"]["kernel"] = grads["a"]["kernel"].at[1].set(jnp.inf)
  flags = np.asarray(nonfinite.nonfinite_flags(jnp.float32(0.5), grads))
  names = nonfinite.flag_names(params)
  assert names == ["loss", "gradient of a/bias", "gradient of a/kernel", "gradient of b/kernel"]
  assert [name for name, flag in zip(names, flags) if flag] == ["gradient of a/kernel"]


def _metrics(bad_steps, first_step, count, flag_index=2, width=4):
  records = []
  for step in range(first_step, first_step + count):
    flags = np.zeros(width, bool)
    if step in bad_steps:
      flags[flag_index] = True
    records.append({"loss": 1.0, nonfinite.FLAGS_KEY: flags})
  return records


_NAMES = ["loss", "gradient of a/bias", "gradient of a/kernel", "gradient of b/kernel"]


def test_monitor_raise_names_step_and_leaf():
  monitor = nonfinite.NonFiniteMonitor("raise", _NAMES, steps_per_epoch=10)
  assert len(monitor.check(_metrics(set(), 1, 5), first_step=1)) == 5
  with pytest.raises(nonfinite.NonFiniteError) as info:
    monitor.check(_metrics({13, 14}, 6, 10), first_step=6)
  message = str(info.value)
  assert "step 13 (epoch 2, batch 3 of 10)" in message
  assert "non-finite gradient of a/kernel" in message
  assert "--config.on_nonfinite=skip" in message


def test_monitor_skip_counts_and_logs(caplog):
  monitor = nonfinite.NonFiniteMonitor("skip", _NAMES, steps_per_epoch=10, skipped_steps=2)
  with caplog.at_level(logging.WARNING):
    finite = monitor.check(_metrics({3, 7}, 1, 10), first_step=1)
  assert len(finite) == 8
  assert all(nonfinite.FLAGS_KEY not in m for m in finite)
  assert monitor.skipped_steps == 4
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2
  assert "Skipped step 7 (epoch 1, batch 7 of 10)" in warnings[1]
  assert "4 step(s) skipped so far" in warnings[1]


def test_monitor_skip_stops_after_consecutive_limit():
  monitor = nonfinite.NonFiniteMonitor("skip", _NAMES, steps_per_epoch=10, max_consecutive_skips=3)
  monitor.check(_metrics({1, 2}, 1, 3), first_step=1)  # Two in a row, then a finite step.
  with pytest.raises(nonfinite.NonFiniteError, match="3 steps in a row up to step 6"):
    monitor.check(_metrics({4, 5, 6}, 4, 3), first_step=4)


def test_monitor_unknown_mode_raises():
  with pytest.raises(ValueError, match="on_nonfinite must be one of raise, skip, got 'ignore'"):
    nonfinite.NonFiniteMonitor("ignore", _NAMES, steps_per_epoch=10)
