"""Tests for jaxbase.attacks: closed forms on linear models, invariants, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbase import attacks

SHAPE = (4, 4, 1)
DIMS = int(np.prod(SHAPE))


def _linear_logits_fn(weights, bias):
  """Logits of a linear classifier on flattened pixels: x @ weights + bias."""
  return lambda images: images.reshape(images.shape[0], -1) @ weights + bias


def _binary_linear(seed=0):
  rng = np.random.default_rng(seed)
  weights = jnp.asarray(rng.normal(size=(DIMS, 2)), jnp.float32)
  return _linear_logits_fn(weights, jnp.zeros(2)), weights


def _interior_images(count, seed=1):
  """Pixels in [0.3, 0.7], so a 0.1 perturbation never touches the [0, 1] box."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.3, 0.7, size=(count, *SHAPE)), jnp.float32)


def _optimal_linf(images, labels, weights, eps):
  """The L-inf optimum for a two-class linear model: move against w_label - w_other."""
  margin_direction = weights[:, labels] - weights[:, 1 - labels]  # [dims, batch]
  delta = -eps * jnp.sign(margin_direction.T).reshape(images.shape)
  return images + delta


def test_fgsm_linear_model_closed_form():
  logits_fn, weights = _binary_linear()
  images = _interior_images(6)
  labels = jnp.array([0, 1, 0, 1, 1, 0])
  adversarial = attacks.fgsm(logits_fn, images, labels, eps=0.1)
  np.testing.assert_allclose(adversarial, _optimal_linf(images, labels, weights, 0.1), atol=1e-6)


def test_pgd_linear_model_reaches_optimum_from_random_start():
  logits_fn, weights = _binary_linear()
  images = _interior_images(6)
  labels = jnp.array([1, 1, 0, 0, 1, 0])
  adversarial = attacks.pgd(
      logits_fn, images, labels, jax.random.key(0), eps=0.1, step_size=0.05, num_steps=5
  )
  np.testing.assert_allclose(adversarial, _optimal_linf(images, labels, weights, 0.1), atol=1e-6)


def test_pgd_l2_linear_model_closed_form():
  # For a linear margin the L2 optimum is eps along -(w_label - w_other) / ||.||.
  logits_fn, weights = _binary_linear()
  images = _interior_images(3)
  labels = jnp.array([0, 1, 0])
  eps = 0.2
  adversarial = attacks.pgd(
      logits_fn, images, labels, eps=eps, step_size=0.05, num_steps=10, norm="l2", random_init=False
  )
  direction = (weights[:, labels] - weights[:, 1 - labels]).T
  direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
  expected = images - eps * direction.reshape(images.shape)
  np.testing.assert_allclose(adversarial, expected, atol=1e-5)


def test_targeted_attack_moves_towards_target():
  logits_fn, weights = _binary_linear()
  images = _interior_images(4)
  targets = jnp.array([1, 0, 1, 0])
  adversarial = attacks.fgsm(logits_fn, images, targets, eps=0.1, targeted=True)
  # Moving towards the target is moving away from the other class.
  np.testing.assert_allclose(
      adversarial, _optimal_linf(images, 1 - targets, weights, 0.1), atol=1e-6
  )


class SmallCNN(nn.Module):

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(4, (3, 3))(images)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.tanh(x).reshape(images.shape[0], -1)
    return nn.Dense(3)(x)


def _small_cnn():
  model = SmallCNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  variables = jax.tree.map(lambda v: v * 3.0, variables)  # Sharper logits than the init.
  return model, variables


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_every_iterate_in_ball_and_box(norm, eps):
  model, variables = _small_cnn()
  logits_fn = attacks.make_logits_fn(model, variables)
  rng = np.random.default_rng(2)
  # Pixels near 0 and 1 make the [0, 1] clip bind.
  images = jnp.asarray(rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], size=(8, *SHAPE)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 8))
  key = jax.random.key(3)
  start = attacks.clip_to_pixels(
      images, attacks.project(attacks.random_start(key, images.shape, eps, norm), eps, norm)
  )
  iterates = [images + start]
  for num_steps in range(1, 6):
    # The attack is deterministic given the key, so num_steps=k returns iterate k.
    iterates.append(
        attacks.pgd(
            logits_fn,
            images,
            labels,
            key,
            eps=eps,
            step_size=eps / 2,
            num_steps=num_steps,
            norm=norm,
        )
    )
  for iterate in iterates:
    delta = np.asarray(iterate - images).reshape(8, -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps + 1e-5
    assert float(iterate.min()) >= 0.0
    assert float(iterate.max()) <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_fills_ball(norm):
  eps = 0.3
  start = attacks.random_start(jax.random.key(0), (2000, 2, 1, 1), eps, norm)
  flat = np.asarray(start).reshape(2000, -1)
  sizes = np.abs(flat).max(axis=1) if norm == "linf" else np.linalg.norm(flat, axis=1)
  assert sizes.max() <= eps + 1e-6
  # Uniform in a 2-d ball: P(radius < eps / 2) is 1/4 for both norms.
  np.testing.assert_allclose(np.mean(sizes < eps / 2), 0.25, atol=0.03)


def _robust_accuracy(logits_fn, images, labels, adversarial):
  return float(jnp.mean(jnp.argmax(logits_fn(adversarial), -1) == labels))


def test_robust_accuracy_monotone_in_eps_and_clean_at_zero():
  model, variables = _small_cnn()
  logits_fn = attacks.make_logits_fn(model, variables)
  images = _interior_images(64, seed=5)
  labels = jnp.argmax(logits_fn(images), -1)  # Clean accuracy 100% by construction.
  accuracies = []
  for eps in (0.0, 0.02, 0.05, 0.1, 0.2):
    adversarial = attacks.pgd(
        logits_fn,
        images,
        labels,
        jax.random.key(1),
        eps=eps,
        step_size=max(eps / 4, 1e-3),
        num_steps=10,
        restarts=2,
    )
    accuracies.append(_robust_accuracy(logits_fn, images, labels, adversarial))
  assert accuracies[0] == 1.0
  assert all(a >= b for a, b in zip(accuracies, accuracies[1:])), accuracies
  assert accuracies[-1] < accuracies[0]


def test_pgd_at_least_as_strong_as_fgsm():
  model, variables = _small_cnn()
  logits_fn = attacks.make_logits_fn(model, variables)
  images = _interior_images(64, seed=6)
  labels = jnp.argmax(logits_fn(images), -1)
  eps = 0.05
  fgsm_images = attacks.fgsm(logits_fn, images, labels, eps=eps)
  # Restart 0 starts at the FGSM point, so per example PGD keeps something at least as strong.
  pgd_images = attacks.pgd(
      logits_fn,
      images,
      labels,
      jax.random.key(0),
      eps=eps,
      step_size=eps / 4,
      num_steps=10,
      restarts=3,
      init_delta=fgsm_images - images,
  )
  fgsm_loss = attacks.losses.cross_entropy(logits_fn(fgsm_images), labels)
  pgd_loss = attacks.losses.cross_entropy(logits_fn(pgd_images), labels)
  assert _robust_accuracy(logits_fn, images, labels, pgd_images) <= _robust_accuracy(
      logits_fn, images, labels, fgsm_images
  )
  assert float(jnp.mean(pgd_loss)) >= float(jnp.mean(fgsm_loss))


def test_restarts_keep_strongest_per_example():
  model, variables = _small_cnn()
  logits_fn = attacks.make_logits_fn(model, variables)
  images = _interior_images(32, seed=7)
  labels = jnp.argmax(logits_fn(images), -1)
  kwargs = dict(eps=0.03, step_size=0.01, num_steps=3)
  single = attacks.pgd(logits_fn, images, labels, jax.random.key(4), **kwargs)
  multi = attacks.pgd(logits_fn, images, labels, jax.random.key(4), restarts=4, **kwargs)
  # Restart 0 of the multi-restart run is the single run, so no example gets weaker.
  single_fooled = jnp.argmax(logits_fn(single), -1) != labels
  multi_fooled = jnp.argmax(logits_fn(multi), -1) != labels
  assert bool(jnp.all(multi_fooled | ~single_fooled))
  single_loss = attacks.losses.cross_entropy(logits_fn(single), labels)
  multi_loss = attacks.losses.cross_entropy(logits_fn(multi), labels)
  both_unfooled = ~single_fooled & ~multi_fooled
  assert bool(jnp.all(jnp.where(both_unfooled, multi_loss >= single_loss - 1e-6, True)))


def test_attack_leaves_batch_stats_untouched():
  model, variables = _small_cnn()
  before = jax.tree.map(np.asarray, variables)
  images = _interior_images(8)
  labels = jnp.zeros(8, jnp.int32)
  for train in (False, True):
    logits_fn = attacks.make_logits_fn(model, variables, train=train)
    attacks.pgd(logits_fn, images, labels, jax.random.key(0), eps=0.1, step_size=0.05, num_steps=2)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))


def test_batch_equals_examples_alone():
  model, variables = _small_cnn()
  logits_fn = attacks.make_logits_fn(model, variables)
  images = _interior_images(5, seed=8)
  labels = jnp.array([0, 1, 2, 0, 1])
  start = attacks.random_start(jax.random.key(9), images.shape, 0.1, "linf")
  kwargs = dict(eps=0.1, step_size=0.02, num_steps=4, random_init=False)
  batch = attacks.pgd(logits_fn, images, labels, init_delta=start, **kwargs)
  for i in range(5):
    alone = attacks.pgd(
        logits_fn, images[i : i + 1], labels[i : i + 1], init_delta=start[i : i + 1], **kwargs
    )
    np.testing.assert_allclose(batch[i : i + 1], alone, atol=1e-6)


def test_jit_and_vmap_match_eager():
  logits_fn, _ = _binary_linear()
  images = _interior_images(4)
  labels = jnp.array([0, 1, 1, 0])
  key = jax.random.key(0)

  def attack(images, labels, key):
    return attacks.pgd(logits_fn, images, labels, key, eps=0.1, step_size=0.03, num_steps=3)

  eager = attack(images, labels, key)
  np.testing.assert_allclose(jax.jit(attack)(images, labels, key), eager, atol=1e-6)
  # vmap over groups of examples, each group attacked as its own batch.
  grouped = jax.vmap(attack, in_axes=(0, 0, None))(
      images.reshape(2, 2, *SHAPE), labels.reshape(2, 2), key
  )
  assert grouped.shape == (2, 2, *SHAPE)
  np.testing.assert_allclose(grouped[0], attack(images[:2], labels[:2], key), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": -0.1}, "eps must be finite and >= 0, got -0.1"),
        ({"eps": float("nan")}, "eps must be finite"),
        ({"eps": float("inf")}, "eps must be finite"),
        ({"step_size": -1.0}, "step_size must be finite and >= 0"),
        ({"norm": "l1"}, "unknown norm 'l1'"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"restarts": 0}, "restarts must be >= 1"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
  logits_fn, _ = _binary_linear()
  arguments = dict(eps=0.1, step_size=0.01, num_steps=1)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=message):
    attacks.pgd(logits_fn, _interior_images(2), jnp.array([0, 1]), jax.random.key(0), **arguments)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.full((2, *SHAPE), 2.0, np.float32), "images must be in \\[0, 1\\]"),
        (np.full((2, *SHAPE), -0.5, np.float32), "pass images before normalization"),
        (np.full((2, *SHAPE), 128, np.uint8), "images must be float in \\[0, 1\\], got uint8"),
    ],
)
def test_images_outside_pixel_range_raise(images, message):
  logits_fn, _ = _binary_linear()
  with pytest.raises(ValueError, match=message):
    attacks.fgsm(logits_fn, jnp.asarray(images), jnp.array([0, 1]), eps=0.1)


def test_random_start_without_key_raises():
  logits_fn, _ = _binary_linear()
  with pytest.raises(ValueError, match="needs a PRNG key"):
    attacks.pgd(
        logits_fn, _interior_images(2), jnp.array([0, 1]), eps=0.1, step_size=0.01, num_steps=1
    )
