"""Tests for bfloat16 compute (`model.dtype='bfloat16'`) with float32 storage, on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbase import models, optim
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def _model(name, dtype):
  config = ml_collections.ConfigDict({"name": name, "dtype": dtype, "mean": (0.3,), "std": (0.4,)})
  return models.build_model(config, NUM_CLASSES)


def _optimizer():
  config = ml_collections.ConfigDict(
      {
          "name": "sgd",
          "lr": 0.1,
          "momentum": 0.9,
          "nesterov": True,
          "weight_decay": 5e-4,
          "schedule": "constant",
      }
  )
  return optim.build(config, steps_per_epoch=4, total_steps=4)


def _batches(num_steps, size=16):
  rng = np.random.default_rng(0)
  return [
      {
          "images": rng.integers(0, 256, (size, *IMAGE_SHAPE), dtype=np.uint8),
          "labels": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
      }
      for _ in range(num_steps)
  ]


def _float_dtypes(tree):
  return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize("name", ["resnet8", "cnn_small"])
def test_bfloat16_trains_with_float32_state(name):
  launcher = DataParallel("shard_map")
  model = _model(name, "bfloat16")
  optimizer, schedule = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, *IMAGE_SHAPE)), seed=0)
  train_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, schedule=schedule)
  )
  state = launcher.replicate(state)
  losses = []
  for batch in _batches(3):
    state, metrics = train_step(state, launcher.shard_batch(batch))
    assert metrics["loss"].dtype == jnp.float32
    losses.append(float(metrics["loss"]))
  state = jax.device_get(launcher.unreplicate(state))

  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] != losses[0]  # The params moved.
  assert _float_dtypes(state.params) == {np.dtype(np.float32)}
  assert _float_dtypes(state.opt_state) == {np.dtype(np.float32)}
  if name.startswith("resnet"):
    assert _float_dtypes(state.batch_stats) == {np.dtype(np.float32)}


@pytest.mark.parametrize("name", ["resnet8", "cnn_small"])
def test_bfloat16_computes_in_bfloat16_with_float32_logits(name):
  variables = _model(name, "float32").init(
      jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False
  )
  images = jnp.asarray(_batches(1)[0]["images"], jnp.float32) / 255

  apply32 = jax.jit(functools.partial(_model(name, "float32").apply, train=False))
  apply16 = jax.jit(
      functools.partial(_model(name, "bfloat16").apply, train=False, capture_intermediates=True)
  )
  logits32 = apply32(variables, images)
  logits16, captured = apply16(variables, images)

  assert logits16.dtype == jnp.float32
  # Every convolution computes in bfloat16.
  conv_outputs = [
      output
      for path, output in jax.tree_util.tree_flatten_with_path(captured["intermediates"])[0]
      if any("conv" in str(getattr(key, "key", "")) for key in path)
  ]
  assert conv_outputs
  assert {x.dtype for x in conv_outputs} == {jnp.dtype(jnp.bfloat16)}
  # bfloat16 keeps 8 significant bits (rounding error up to 0.4% per operation), so
  # the logits are allowed 3% of their scale.
  scale = float(jnp.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.03 * scale + 1e-3)
  assert not np.array_equal(np.asarray(logits16), np.asarray(logits32))
