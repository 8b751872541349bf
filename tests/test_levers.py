"""Tests for the regularization levers: stochastic depth, head dropout, EMA, weight-decay
modes, mixing in the train step, and the config checks that guard them."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxbase import checkpoint, losses, models, optim
from jaxbase.configs import default as default_config
from jaxbase.configs import digits_resnet
from jaxbase.data import augment
from jaxbase.train import loop
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state

IMAGES = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
LABELS = jnp.arange(8) % 4


def _resnet8(**fields):
  config = ml_collections.ConfigDict({"name": "resnet8", "mean": (0.5,), "std": (0.25,), **fields})
  return models.build_model(config, 4, axis_name=None)


def _apply(model, variables, train, seed=0):
  return model.apply(
      variables,
      IMAGES,
      train=train,
      rngs={"dropout": jax.random.key(seed)},
      mutable=["batch_stats"] if train else False,
  )


# Stochastic depth and head dropout.


@pytest.mark.parametrize("field", ["drop_path_rate", "head_dropout_rate"])
def test_dropout_levers_leave_eval_unchanged(field):
  base = _resnet8()
  variables = base.init(jax.random.key(1), IMAGES, train=False)
  regularized = _resnet8(**{field: 0.5})
  np.testing.assert_array_equal(
      _apply(base, variables, train=False), _apply(regularized, variables, train=False)
  )


@pytest.mark.parametrize("field", ["drop_path_rate", "head_dropout_rate"])
def test_dropout_levers_change_training_output(field):
  base = _resnet8()
  variables = base.init(jax.random.key(1), IMAGES, train=False)
  plain_logits, _ = _apply(base, variables, train=True)
  regularized_logits, _ = _apply(_resnet8(**{field: 0.5}), variables, train=True)
  assert not np.allclose(plain_logits, regularized_logits)


def test_drop_path_rejected_without_shortcuts():
  with pytest.raises(ValueError, match="drop_path_rate"):
    _resnet8(plain=True, drop_path_rate=0.1).init(jax.random.key(0), IMAGES, train=False)


def test_cnn_rejects_resnet_only_levers():
  config = ml_collections.ConfigDict({"name": "cnn_small", "drop_path_rate": 0.1})
  with pytest.raises(ValueError, match="drop_path_rate"):
    models.build_model(config, 10)


# EMA.


def _train(ema_decay, num_steps=4, mix=None):
  model = _resnet8()
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = create_train_state(model, optimizer, IMAGES[:1], seed=0, ema=ema_decay > 0)
  launcher = DataParallel("shard_map", devices=jax.devices()[:1])
  model = models.build_model(
      ml_collections.ConfigDict({"name": "resnet8", "mean": (0.5,), "std": (0.25,)}), 4
  )
  step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, ema_decay=ema_decay, mix=mix)
  )
  state = launcher.replicate(state)
  history = []
  for i in range(num_steps):
    batch = {"images": IMAGES, "labels": LABELS}
    state, _ = step(state, launcher.shard_batch(batch))
    history.append(jax.device_get(state))
  return history


def test_ema_follows_its_formula():
  history = _train(ema_decay=0.9)
  expected = jax.device_get(
      create_train_state(_resnet8(), optax.sgd(0.1, momentum=0.9), IMAGES[:1], seed=0).params
  )
  for step, state in enumerate(history):
    decay = min(0.9, (1 + step) / (10 + step))
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, state.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        state.ema["params"],
        expected,
    )


def test_ema_leaves_training_unchanged():
  with_ema = _train(ema_decay=0.99)[-1]
  without = _train(ema_decay=0.0)[-1]
  assert without.ema is None
  jax.tree.map(np.testing.assert_array_equal, with_ema.params, without.params)


def test_eval_uses_ema_variables():
  state = _train(ema_decay=0.9, num_steps=2)[-1]
  assert state.eval_variables()["params"] is state.ema["params"]
  no_ema = _train(ema_decay=0.0, num_steps=1)[-1]
  assert no_ema.eval_variables()["params"] is no_ema.params


def test_ema_decay_ramp():
  np.testing.assert_allclose(steps_lib.ema_decay_at(0.999, jnp.asarray(0)), 0.1)
  np.testing.assert_allclose(steps_lib.ema_decay_at(0.999, jnp.asarray(10**6)), 0.999)


# Mixing inside the train step.


def test_mix_with_one_hot_targets_equals_no_mix():
  def one_hot_mix(key, images, labels):
    return images, jax.nn.one_hot(labels, 4)

  mixed = _train(0.0, num_steps=2, mix=one_hot_mix)[-1]
  plain = _train(0.0, num_steps=2)[-1]
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      mixed.params,
      plain.params,
  )


def test_mixup_changes_training():
  mix = functools.partial(augment.mixup, num_classes=4, alpha=1.0)
  mixed = _train(0.0, num_steps=2, mix=mix)[-1]
  plain = _train(0.0, num_steps=2)[-1]
  assert not np.allclose(jax.tree.leaves(mixed.params)[0], jax.tree.leaves(plain.params)[0])


def test_soft_cross_entropy_matches_hard_on_one_hot():
  logits = jax.random.normal(jax.random.key(3), (8, 4))
  np.testing.assert_allclose(
      losses.soft_cross_entropy(logits, jax.nn.one_hot(LABELS, 4), 0.1),
      losses.cross_entropy(logits, LABELS, 0.1),
      rtol=1e-6,
  )


# Weight-decay modes.


def _update(name, mode, weight_decay=0.1, momentum=0.9, steps=2):
  config = ml_collections.ConfigDict(
      {
          "name": name,
          "lr": 0.5,
          "momentum": momentum,
          "nesterov": False,
          "weight_decay": weight_decay,
          "weight_decay_mode": mode,
          "schedule": "constant",
      }
  )
  tx, _ = optim.build(config, steps_per_epoch=1, total_steps=10)
  params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
  grads = {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.full((2,), 0.5)}
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_l2_equals_default():
  jax.tree.map(np.testing.assert_array_equal, _update("sgd", "l2"), _update("sgd", "default"))


def test_sgd_decoupled_closed_form():
  # SGDW, momentum m: v1 = g, p1 = p0 - lr (v1 + wd p0); v2 = m v1 + g, p2 = p1 - lr (v2 + wd p1).
  lr, wd, m, g, p0 = 0.5, 0.1, 0.9, 0.5, 2.0
  p1 = p0 - lr * (g + wd * p0)
  p2 = p1 - lr * (m * g + g + wd * p1)
  params = _update("sgd", "decoupled")
  np.testing.assert_allclose(params["kernel"], p2, rtol=1e-6)
  # Biases are not decayed.
  np.testing.assert_allclose(params["bias"], p0 - lr * g - lr * (m * g + g), rtol=1e-6)


def test_sgd_decoupled_differs_from_l2_with_momentum():
  assert not np.allclose(_update("sgd", "decoupled")["kernel"], _update("sgd", "l2")["kernel"])


def test_adam_decoupled_equals_adamw():
  jax.tree.map(
      np.testing.assert_array_equal, _update("adam", "decoupled"), _update("adamw", "default")
  )


def test_adam_l2_differs_from_adamw():
  assert not np.allclose(_update("adam", "l2")["kernel"], _update("adamw", "default")["kernel"])


@pytest.mark.parametrize(
    "name, mode, message",
    [
        ("adam", "default", "weight_decay_mode='l2'"),
        ("lamb", "l2", "own form of weight decay"),
        ("sgd", "sideways", "unknown optim.weight_decay_mode"),
    ],
)
def test_weight_decay_mode_errors(name, mode, message):
  with pytest.raises(ValueError, match=message):
    _update(name, mode)


# Config checks.


def _digits_config(**overrides):
  config = digits_resnet.get_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 1.0}, "set one of them to 0"),
        ({"augment.mixup_alpha": 0.2, "adversarial.method": "pgd"}, "hard labels"),
        ({"augment.cutout": -2}, "augment.cutout must be"),
        ({"augment.mixup_alpha": -1.0}, "augment.mixup_alpha must be"),
        ({"ema.decay": 1.5}, "ema.decay must be"),
    ],
)
def test_bad_lever_configs_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    loop.setup_run(_digits_config(**overrides))


def test_new_config_keys_resume_old_checkpoints():
  current = default_config.get_config().to_dict()
  saved = default_config.get_config().to_dict()
  del saved["ema"]
  del saved["augment"]["cutout"]
  defaults = default_config.get_config().to_dict()
  assert checkpoint.config_differences(saved, current, defaults) == []
  current["augment"]["cutout"] = 8
  assert checkpoint.config_differences(saved, current, defaults) == [
      "augment.cutout: 0 in the checkpoint, 8 now"
  ]
