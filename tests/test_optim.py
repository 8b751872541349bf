"""Tests for jaxbase.optim: the weight-decay mask, schedules and bad values."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxbase import optim


def _params():
  return {
      "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
      "bn": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
      "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
  }


def _config(**overrides):
  config = ml_collections.ConfigDict(
      {
          "name": "sgd",
          "lr": 0.1,
          "momentum": 0.0,
          "nesterov": False,
          "weight_decay": 0.5,
          "schedule": "constant",
          "warmup_epochs": 0.0,
          "clip_norm": None,
      }
  )
  config.update(overrides)
  return config


def test_decay_mask_marks_kernels_only():
  mask = optim.decay_mask(_params())
  assert mask == {
      "conv": {"kernel": True},
      "bn": {"scale": False, "bias": False},
      "dense": {"kernel": True, "bias": False},
  }


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lars"])
def test_weight_decay_reaches_kernels_only(name):
  # With zero gradients, only weight decay moves parameters.
  params = _params()
  optimizer, _ = optim.build(_config(name=name), steps_per_epoch=10, total_steps=100)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0
  assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
  for leaf in (updates["bn"]["scale"], updates["bn"]["bias"], updates["dense"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_sgd_weight_decay_closed_form():
  params = _params()
  optimizer, _ = optim.build(_config(weight_decay=0.5, lr=0.1), steps_per_epoch=1, total_steps=1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  # kernel: -lr * (grad + wd * param) = -0.1 * 1.5; bias: -lr * grad.
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.15, rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], -0.1, rtol=1e-6)


def test_clipping_bounds_the_update():
  params = {"w": jnp.zeros((2, 2))}
  optimizer, _ = optim.build(
      _config(weight_decay=0.0, clip_norm=1.0, lr=1.0), steps_per_epoch=1, total_steps=1
  )
  grads = {"w": jnp.full((2, 2), 10.0)}
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


def test_warmup_cosine_schedule_values():
  schedule = optim.build_schedule(
      _config(schedule="cosine", warmup_epochs=1.0), steps_per_epoch=10, total_steps=110
  )
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-8)
  np.testing.assert_allclose(schedule(5), 0.05, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.05, rtol=1e-5)  # Half-way through the cosine.
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)


def test_step_schedule_boundaries_in_epochs():
  schedule = optim.build_schedule(
      _config(schedule="step", decay_epochs=(2, 4), decay_factor=0.1),
      steps_per_epoch=10,
      total_steps=60,
  )
  np.testing.assert_allclose(
      [schedule(19), schedule(20), schedule(39), schedule(40)], [0.1, 0.01, 0.01, 0.001], rtol=1e-5
  )


def test_onecycle_peaks_at_lr():
  schedule = optim.build_schedule(
      _config(schedule="onecycle", pct_start=0.25, div_factor=25.0, final_div_factor=1e4),
      steps_per_epoch=10,
      total_steps=100,
  )
  np.testing.assert_allclose(schedule(0), 0.1 / 25, rtol=1e-5)
  np.testing.assert_allclose(schedule(25), 0.1, rtol=1e-5)
  assert float(schedule(100)) < 1e-5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "rmsprop"}, "unknown optim.name 'rmsprop'"),
        ({"schedule": "linear"}, "unknown optim.schedule 'linear'"),
        ({"lr": -0.1}, "optim.lr must be positive"),
        ({"weight_decay": -1.0}, "optim.weight_decay must be >= 0"),
        ({"name": "adam", "weight_decay": 0.1}, "use 'adamw'"),
        ({"schedule": "cosine", "warmup_epochs": 20.0}, "set optim.warmup_epochs below num_epochs"),
    ],
)
def test_bad_values_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    optim.build(_config(**overrides), steps_per_epoch=10, total_steps=100)
