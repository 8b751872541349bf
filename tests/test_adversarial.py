"""Tests for adversarial training as an option of the ordinary train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbase import attacks, optim
from jaxbase.train import adversarial as adversarial_lib
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state


class TinyNet(nn.Module):

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(images)
    x = nn.BatchNorm(use_running_average=not train, axis_name="data", momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(3)(x)


def _adversarial(**overrides):
  config = adversarial_lib.default_config()
  config.update(overrides)
  return config


def _run(adversarial, num_steps=2, devices=None):
  model = TinyNet()
  optimizer, _ = optim.build(
      ml_collections.ConfigDict(
          {"name": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "constant"}
      ),
      steps_per_epoch=2,
      total_steps=4,
  )
  launcher = DataParallel("shard_map", devices=devices)
  state = launcher.replicate(create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0))
  train_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, adversarial=adversarial, steps_per_epoch=2)
  )
  rng = np.random.default_rng(0)
  for _ in range(num_steps):
    batch = {
        "images": rng.integers(0, 256, (16, 6, 6, 1), dtype=np.uint8),
        "labels": rng.integers(0, 3, 16).astype(np.int32),
    }
    state, _ = train_step(state, launcher.shard_batch(batch))
  return jax.device_get(state)


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_method_none_equals_standard_training():
  _assert_trees_equal(_run(_adversarial(method="none")), _run(None))


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_zero_eps_equals_standard_training(method):
  expected = _run(None)
  actual = _run(_adversarial(method=method, eps=0.0, step_size=0.0))
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
      expected.params,
      actual.params,
  )


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs", "trades"])
def test_attack_changes_the_update(method):
  clean = _run(None)
  adversarial = _run(_adversarial(method=method, eps=0.2, step_size=0.05, num_steps=2))
  difference = jax.tree.map(
      lambda x, y: float(np.abs(x - y).max()), clean.params, adversarial.params
  )
  assert max(jax.tree.leaves(difference)) > 1e-4


def test_trades_zero_beta_matches_clean_params():
  # With beta = 0 the loss is the clean cross-entropy, so the parameter update is
  # the clean one; only BatchNorm statistics also see the adversarial batch.
  expected = _run(None)
  actual = _run(_adversarial(method="trades", trades_beta=0.0, eps=0.2, step_size=0.05))
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
      expected.params,
      actual.params,
  )


def test_eps_warmup_is_linear_then_flat():
  config = _adversarial(method="pgd", eps_warmup_epochs=2.0)
  scales = [
      float(adversarial_lib.eps_scale(config, jnp.int32(s), steps_per_epoch=5))
      for s in (0, 4, 9, 10, 50)
  ]
  np.testing.assert_allclose(scales, [0.1, 0.5, 1.0, 1.0, 1.0], rtol=1e-6)
  no_warmup = adversarial_lib.eps_scale(_adversarial(), jnp.int32(0), steps_per_epoch=5)
  assert float(no_warmup) == 1.0


def test_clean_fraction_keeps_leading_rows_clean():
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights
  images = jnp.full((8, 4, 4, 1), 0.5)
  labels = jnp.zeros(8, jnp.int32)
  config = _adversarial(method="pgd", eps=0.1, step_size=0.05, num_steps=2, clean_fraction=0.25)
  crafted = adversarial_lib.craft(config, logits_fn, images, labels, jax.random.key(0), 1.0)
  np.testing.assert_array_equal(crafted[:2], images[:2])
  assert float(jnp.abs(crafted[2:] - images[2:]).min()) > 0
  assert float(jnp.abs(crafted - images).max()) <= 0.1 + 1e-6


def test_fgsm_rs_step_is_1_25_eps():
  # On a linear model the FGSM-RS point is clip(start + 1.25 eps * sign(grad), -eps, eps):
  # every coordinate ends on the ball's boundary unless the start was near the far side.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(16, 2)), jnp.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights
  images = jnp.full((4, 4, 4, 1), 0.5)
  labels = jnp.array([0, 1, 0, 1])
  config = _adversarial(method="fgsm_rs", eps=0.1)
  key = jax.random.key(3)
  crafted = adversarial_lib.craft(config, logits_fn, images, labels, key, 1.0)
  start = attacks.random_start(jax.random.fold_in(key, 0), images.shape, 0.1, "linf")
  direction = jnp.sign(
      jax.grad(lambda x: jnp.sum(attacks.losses.cross_entropy(logits_fn(x), labels)))(
          images + start
      )
  )
  expected = images + jnp.clip(start + 0.125 * direction, -0.1, 0.1)
  np.testing.assert_allclose(crafted, expected, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "free"}, "unknown adversarial.method 'free'"),
        ({"method": "pgd", "eps": -0.1}, "eps must be finite and >= 0"),
        ({"method": "pgd", "norm": "l1"}, "unknown norm 'l1'"),
        ({"method": "pgd", "clean_fraction": 1.0}, "clean_fraction must be in \\[0, 1\\)"),
        ({"method": "trades", "clean_fraction": 0.5}, "does not apply to TRADES"),
        ({"method": "trades", "trades_beta": -1.0}, "trades_beta must be >= 0"),
        ({"method": "pgd", "eps_warmup_epochs": -1.0}, "eps_warmup_epochs must be >= 0"),
    ],
)
def test_bad_config_raises(overrides, message):
  with pytest.raises(ValueError, match=message):
    adversarial_lib.check_config(_adversarial(**overrides))
