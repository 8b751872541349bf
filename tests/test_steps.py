"""Tests for the per-replica steps and the launcher, on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbase import losses, optim
from jaxbase.data import pipeline
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state

NUM_CLASSES = 3


class TinyNet(nn.Module):
  """Conv, BatchNorm over the 'data' axis, ReLU, global average pool, dense."""

  axis_name: str | None = "data"

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(images)
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(x).astype(jnp.float32)


def _optimizer():
  config = ml_collections.ConfigDict(
      {
          "name": "sgd",
          "lr": 0.1,
          "momentum": 0.9,
          "nesterov": True,
          "weight_decay": 5e-4,
          "schedule": "cosine",
          "warmup_epochs": 1.0,
          "clip_norm": 1.0,
      }
  )
  return optim.build(config, steps_per_epoch=2, total_steps=8)


def _batches(num_steps, global_batch=16, seed=0):
  rng = np.random.default_rng(seed)
  return [
      {
          "images": rng.integers(0, 256, (global_batch, 6, 6, 1), dtype=np.uint8),
          "labels": rng.integers(0, NUM_CLASSES, global_batch).astype(np.int32),
      }
      for _ in range(num_steps)
  ]


def _run(launcher, num_steps=3):
  model = TinyNet()
  optimizer, schedule = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0)
  state = launcher.replicate(state)
  train_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, schedule=schedule, label_smoothing=0.1)
  )
  history = []
  for batch in _batches(num_steps):
    state, metrics = train_step(state, launcher.shard_batch(batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(launcher.unreplicate(state)), history, train_step


def _assert_trees_close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol), a, b)


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  state8, metrics8, _ = _run(DataParallel("shard_map"))
  state1, metrics1, _ = _run(DataParallel("shard_map", devices=jax.devices()[:1]))
  _assert_trees_close(state8.params, state1.params)
  _assert_trees_close(state8.batch_stats, state1.batch_stats)
  _assert_trees_close(metrics8, metrics1)
  assert int(state8.step) == int(state1.step) == 3


def test_pmap_equals_shard_map():
  state_sm, metrics_sm, _ = _run(DataParallel("shard_map"))
  state_pm, metrics_pm, _ = _run(DataParallel("pmap"))
  _assert_trees_close(state_sm.params, state_pm.params)
  _assert_trees_close(state_sm.batch_stats, state_pm.batch_stats)
  _assert_trees_close(state_sm.opt_state, state_pm.opt_state)
  _assert_trees_close(metrics_sm, metrics_pm)


def test_train_step_compiles_once():
  _, _, train_step = _run(DataParallel("shard_map"), num_steps=4)
  assert train_step._cache_size() == 1


def test_train_step_updates_batch_stats_and_step():
  launcher = DataParallel("shard_map")
  model = TinyNet()
  optimizer, _ = _optimizer()
  initial = jax.device_get(create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0))
  state, _, _ = _run(launcher, num_steps=1)
  assert int(state.step) == 1
  assert not np.allclose(
      state.batch_stats["BatchNorm_0"]["mean"], initial.batch_stats["BatchNorm_0"]["mean"]
  )


def test_replica_keys_differ_across_devices():
  launcher = DataParallel("shard_map")

  def keys(root, batch):
    del batch
    return jax.random.key_data(jax.random.wrap_key_data(steps_lib.replica_key(root, jnp.int32(5))))[
        None
    ]

  mapped = jax.jit(
      jax.shard_map(
          keys, mesh=launcher.mesh, in_specs=(jax.P(), jax.P("data")), out_specs=jax.P("data")
      )
  )
  out = np.asarray(mapped(jax.random.PRNGKey(0), jnp.zeros((8,))))
  assert len({tuple(row) for row in out}) == 8


@pytest.mark.parametrize(
    "num_examples, mode", [(37, "shard_map"), (37, "pmap"), (16, "shard_map"), (5, "shard_map")]
)
def test_eval_counts_every_example_once(num_examples, mode):
  launcher = DataParallel(mode)
  model = TinyNet()
  optimizer, _ = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=1)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (num_examples, 6, 6, 1), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32)

  # Reference: the whole set at once, on the host, without a mapped axis.
  logits = TinyNet(axis_name=None).apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(images, jnp.float32) / 255,
      train=False,
  )
  expected_top1 = float(np.mean(np.argmax(logits, -1) == labels))
  expected_loss = float(np.mean(losses.cross_entropy(logits, jnp.asarray(labels))))

  eval_step = launcher.compile_eval_step(steps_lib.make_eval_step(model))
  replicated = launcher.replicate(state)
  totals = {}
  for batch in pipeline.eval_batches(images, labels, global_batch_size=16):
    for name, value in jax.device_get(eval_step(replicated, launcher.shard_batch(batch))).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  summary = steps_lib.summarize_eval(totals)
  assert summary["examples"] == num_examples
  np.testing.assert_allclose(summary["accuracy"], expected_top1, rtol=1e-6)
  np.testing.assert_allclose(summary["loss"], expected_loss, rtol=1e-5)


def test_batch_not_divisible_by_devices_raises():
  with pytest.raises(ValueError, match="batch_size=100 is not divisible by the 8 devices"):
    DataParallel("shard_map").check_batch_size(100)


def test_unknown_parallel_mode_raises():
  with pytest.raises(ValueError, match="unknown parallel mode 'dp'"):
    DataParallel("dp")
