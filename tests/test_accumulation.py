"""Tests for gradient accumulation (`optim.accumulation_steps`), on 8 fake CPU devices."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxbase import checkpoint as checkpoint_lib
from jaxbase import optim
from jaxbase.configs import digits_resnet
from jaxbase.train import steps as steps_lib
from jaxbase.train.loop import setup_run
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state

NUM_CLASSES = 3
MICRO_BATCH = 16
UPDATES_PER_EPOCH = 2
NUM_UPDATES = 3


class NoNormNet(nn.Module):
  """Conv, ReLU, global average pool, dense: no BatchNorm and no dropout.

  Its loss on a batch is the mean of per-example losses, so the gradient on k
  equal micro-batches concatenated is the mean of their gradients, which is
  what accumulation computes. BatchNorm would break this: it normalizes each
  micro-batch with that micro-batch's own statistics.
  """

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    x = nn.relu(nn.Conv(4, (3, 3))(images)).mean(axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(x).astype(jnp.float32)


def _adamw(accumulation):
  # A clip norm below the gradient norm, so clipping acts on every update and
  # would differ if it saw micro-batch gradients instead of their mean.
  config = ml_collections.ConfigDict(
      {
          "name": "adamw",
          "lr": 0.05,
          "weight_decay": 0.1,
          "schedule": "cosine",
          "warmup_epochs": 1.0,
          "clip_norm": 0.05,
          "accumulation_steps": accumulation,
      }
  )
  return optim.build(
      config, steps_per_epoch=UPDATES_PER_EPOCH, total_steps=UPDATES_PER_EPOCH * NUM_UPDATES
  )


def _large_batches(accumulation, seed=0):
  rng = np.random.default_rng(seed)
  size = MICRO_BATCH * accumulation
  return [
      {
          "images": rng.integers(0, 256, (size, 6, 6, 1), dtype=np.uint8),
          "labels": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
      }
      for _ in range(NUM_UPDATES)
  ]


def _start(launcher, optimizer, schedule):
  model = NoNormNet()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0)
  step = launcher.compile_train_step(steps_lib.make_train_step(model, optimizer, schedule=schedule))
  return launcher.replicate(state), step


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulated_micro_batches_equal_one_large_step(accumulation):
  launcher = DataParallel("shard_map")
  batches = _large_batches(accumulation)

  optimizer, schedule = _adamw(accumulation)
  state, train_step = _start(
      launcher, optimizer, optim.schedule_by_train_step(schedule, accumulation)
  )
  learning_rates = []
  for batch in batches:
    for index in range(accumulation):
      rows = slice(index * MICRO_BATCH, (index + 1) * MICRO_BATCH)
      before = jax.device_get(state.params)
      state, metrics = train_step(
          state, launcher.shard_batch({k: v[rows] for k, v in batch.items()})
      )
      learning_rates.append(float(metrics["learning_rate"]))
      if index < accumulation - 1:
        # Micro-steps before the k-th only accumulate: the params stay put.
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  accumulated = jax.device_get(state)

  reference_optimizer, reference_schedule = _adamw(1)
  state, train_step = _start(launcher, reference_optimizer, reference_schedule)
  for batch in batches:
    state, _ = train_step(state, launcher.shard_batch(batch))
  reference = jax.device_get(state)

  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      accumulated.params,
      reference.params,
  )
  assert int(accumulated.step) == NUM_UPDATES * accumulation
  assert int(reference.step) == NUM_UPDATES
  # MultiSteps counts one update per k micro-steps and sits at a boundary.
  assert int(accumulated.opt_state.gradient_step) == NUM_UPDATES
  assert int(accumulated.opt_state.mini_step) == 0
  # Each micro-step reports the learning rate of the update it contributes to.
  expected = [float(schedule(u)) for u in range(NUM_UPDATES) for _ in range(accumulation)]
  np.testing.assert_allclose(learning_rates, expected, rtol=1e-6)
  assert learning_rates[0] == 0.0  # Warmup starts at zero, so the schedule is in play.
  assert learning_rates[-1] > 0.0


def test_accumulation_one_is_the_plain_optimizer():
  optimizer, _ = _adamw(1)
  state = optimizer.init({"w": jnp.zeros((2,))})
  assert not isinstance(state, optax.MultiStepsState)


def test_schedule_by_train_step_maps_steps_to_updates():
  schedule = optim.schedule_by_train_step(lambda update: 10 * update, 3)
  assert [schedule(step) for step in range(7)] == [0, 0, 0, 10, 10, 10, 20]


def test_updates_per_epoch_divides_train_steps():
  config = ml_collections.ConfigDict({"accumulation_steps": 4})
  assert optim.updates_per_epoch(config, 12) == 3
  with pytest.raises(
      ValueError, match=r"accumulation_steps=4 does not divide the 22 .* \[1, 2, 11, 22\]"
  ):
    optim.updates_per_epoch(config, 22)


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_invalid_accumulation_steps_raise(value):
  config = ml_collections.ConfigDict({"accumulation_steps": value})
  with pytest.raises(
      ValueError, match=f"optim.accumulation_steps must be a positive integer, got {value}"
  ):
    optim.accumulation_steps(config)


def test_run_rejects_accumulation_not_dividing_epoch():
  config = digits_resnet.get_config()
  config.batch_size = 64  # 1,437 // 64 = 22 train steps per epoch.
  config.optim.accumulation_steps = 4
  with pytest.raises(ValueError, match="accumulation_steps=4 does not divide the 22 train steps"):
    setup_run(config)


def test_saved_config_without_accumulation_key_resumes():
  current = digits_resnet.get_config().to_dict()
  saved = copy.deepcopy(current)
  del saved["optim"]["accumulation_steps"]  # A config written before the key existed.
  assert checkpoint_lib.config_differences(saved, current) == []
  current["optim"]["accumulation_steps"] = 2
  assert checkpoint_lib.config_differences(saved, current) == [
      "optim.accumulation_steps: 1 in the checkpoint, 2 now"
  ]
