"""Tests for cutout, mixup, cutmix and TrivialAugment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbase.data import augment, trivial_augment
from jaxbase.data.trivial_augment import OPERATIONS


def _images(batch=8, height=8, width=8, channels=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, height, width, channels))


def _labels(batch=8, num_classes=4, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch,), 0, num_classes)


# Cutout.


def test_cutout_same_key_same_output():
  images = _images()
  first = augment.cutout(jax.random.key(3), images, 4)
  second = augment.cutout(jax.random.key(3), images, 4)
  np.testing.assert_array_equal(first, second)


def test_cutout_zeroes_one_clipped_square():
  images = jnp.ones((32, 8, 8, 1))
  out = np.asarray(augment.cutout(jax.random.key(0), images, 4))
  assert out.shape == images.shape
  for image in out[..., 0]:
    zero_rows, zero_cols = np.nonzero(image == 0)
    assert zero_rows.size > 0
    # The zeroed pixels form one axis-aligned rectangle of at most 4 x 4.
    height = zero_rows.max() - zero_rows.min() + 1
    width = zero_cols.max() - zero_cols.min() + 1
    assert height <= 4
    assert width <= 4
    assert zero_rows.size == height * width
    np.testing.assert_array_equal(np.unique(image), [0.0, 1.0])


def test_cutout_size_zero_is_identity():
  images = _images()
  np.testing.assert_array_equal(augment.cutout(jax.random.key(0), images, 0), images)


def test_cutout_rejects_negative_size():
  with pytest.raises(ValueError, match="cutout size"):
    augment.cutout(jax.random.key(0), _images(), -1)


# Mixup and cutmix.


@pytest.mark.parametrize("fn", [augment.mixup, augment.cutmix])
def test_mixing_same_key_same_output(fn):
  images, labels = _images(), _labels()
  first = fn(jax.random.key(5), images, labels, 4, 1.0)
  second = fn(jax.random.key(5), images, labels, 4, 1.0)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])


@pytest.mark.parametrize("fn", [augment.mixup, augment.cutmix])
def test_mixing_targets_sum_to_one(fn):
  images, labels = _images(batch=16), _labels(batch=16)
  for seed in range(5):
    mixed, targets = fn(jax.random.key(seed), images, labels, 4, 0.4)
    assert mixed.shape == images.shape
    assert mixed.dtype == images.dtype
    assert targets.shape == (16, 4)
    assert targets.dtype == jnp.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert float(mixed.min()) >= 0.0
    assert float(mixed.max()) <= 1.0


def test_mixup_is_convex_combination_with_partner():
  images, labels = _images(batch=16), _labels(batch=16)
  mixed, targets = augment.mixup(jax.random.key(2), images, labels, 4, 1.0)
  images, mixed = np.asarray(images), np.asarray(mixed)
  onehot = np.eye(4)[np.asarray(labels)]
  for i in range(16):
    # Find the partner j and weight lam that explain example i exactly.
    explained = False
    for j in range(16):
      diff = images[i] - images[j]
      if i != j and np.abs(diff).max() > 1e-3:
        lam = np.sum((mixed[i] - images[j]) * diff) / np.sum(diff * diff)
        if np.allclose(lam * images[i] + (1 - lam) * images[j], mixed[i], atol=1e-5):
          np.testing.assert_allclose(targets[i], lam * onehot[i] + (1 - lam) * onehot[j], atol=1e-5)
          explained = True
          break
      elif i == j and np.allclose(mixed[i], images[i], atol=1e-6):
        np.testing.assert_allclose(targets[i], onehot[i], atol=1e-6)
        explained = True
        break
    assert explained, f"example {i} is not a mix of two batch images"


def test_cutmix_label_weight_is_kept_area():
  # Each image is constant with its own value and its own class, so the weight
  # on that class must equal the share of pixels still showing that value.
  images = jnp.stack([jnp.full((8, 8, 1), float(i + 1) / 16) for i in range(16)])
  labels = jnp.arange(16)
  for seed in range(4):
    mixed, targets = augment.cutmix(jax.random.key(seed), images, labels, 16, 1.0)
    for i in range(16):
      kept = np.mean(np.isclose(np.asarray(mixed[i]), (i + 1) / 16))
      np.testing.assert_allclose(targets[i, i], kept, atol=1e-6)


def test_cutmix_pastes_from_one_partner():
  images = jnp.stack([jnp.full((8, 8, 1), float(i + 1) / 16) for i in range(16)])
  mixed, _ = augment.cutmix(jax.random.key(4), images, jnp.arange(16) % 4, 4, 1.0)
  for i, image in enumerate(np.asarray(mixed)):
    assert len(np.unique(image)) <= 2
    assert np.isclose(image, (i + 1) / 16).any()


@pytest.mark.parametrize("fn", [augment.mixup, augment.cutmix])
def test_mixing_rejects_bad_input(fn):
  images = _images()
  with pytest.raises(ValueError, match="alpha must be positive"):
    fn(jax.random.key(0), images, _labels(), 4, 0.0)
  with pytest.raises(ValueError, match="one-hot"):
    fn(jax.random.key(0), images, jax.nn.one_hot(_labels(), 4), 4, 1.0)


# TrivialAugment.


def test_trivial_augment_same_key_same_output():
  images = _images(batch=16, height=16, width=16)
  first = trivial_augment.trivial_augment(jax.random.key(9), images)
  second = trivial_augment.trivial_augment(jax.random.key(9), images)
  np.testing.assert_array_equal(first, second)
  third = trivial_augment.trivial_augment(jax.random.key(10), images)
  assert not np.array_equal(first, third)


@pytest.mark.parametrize("channels", [1, 3])
def test_trivial_augment_keeps_shape_and_range(channels):
  images = _images(batch=64, height=16, width=16, channels=channels)
  out = trivial_augment.trivial_augment(jax.random.key(0), images)
  assert out.shape == images.shape
  assert out.dtype == images.dtype
  assert float(out.min()) >= 0.0
  assert float(out.max()) <= 1.0


@pytest.mark.parametrize(
    "name",
    [
        "identity",
        "brightness",
        "color",
        "contrast",
        "sharpness",
        "posterize",
        "solarize",
        "rotate",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    ],
)
def test_operation_at_strength_zero_is_identity(name):
  # Pixels on the 256-level grid, so posterize at 8 bits returns them exactly.
  image = jnp.round(_images(batch=1, height=8, width=8)[0] * 255) / 255
  out = trivial_augment._apply(OPERATIONS.index(name), image, jnp.float32(0.0), 1.0)
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_rotate_quarter_turn_is_rot90():
  image = _images(batch=1, height=8, width=8)[0]
  quarter = 90.0 / trivial_augment.MAX_ROTATE_DEGREES
  out = trivial_augment._apply(OPERATIONS.index("rotate"), image, jnp.float32(quarter), 1.0)
  rotated = [np.rot90(image, k=k, axes=(0, 1)) for k in (1, 3)]
  assert any(np.allclose(out, r, atol=1e-6) for r in rotated)


def test_translate_shifts_and_fills_zero():
  image = _images(batch=1, height=8, width=8)[0]
  one_pixel = 1.0 / (8 * trivial_augment.MAX_TRANSLATE_FRACTION)
  out = np.asarray(
      trivial_augment._apply(OPERATIONS.index("translate_x"), image, jnp.float32(one_pixel), 1.0)
  )
  # Output column c samples input column c + 1, and the last column has no source.
  np.testing.assert_allclose(out[:, :-1], np.asarray(image)[:, 1:], atol=1e-6)
  np.testing.assert_array_equal(out[:, -1], 0.0)


def test_solarize_full_strength_inverts():
  image = _images(batch=1, height=8, width=8)[0]
  out = trivial_augment._apply(OPERATIONS.index("solarize"), image, jnp.float32(1.0), 1.0)
  np.testing.assert_allclose(out, 1.0 - image, atol=1e-6)


def test_autocontrast_stretches_to_full_range():
  image = 0.25 + 0.5 * _images(batch=1, height=8, width=8)[0]
  out = trivial_augment._apply(OPERATIONS.index("autocontrast"), image, jnp.float32(0.5), 1.0)
  np.testing.assert_allclose(out.min(axis=(0, 1)), 0.0, atol=1e-6)
  np.testing.assert_allclose(out.max(axis=(0, 1)), 1.0, atol=1e-6)


def test_equalize_flattens_histogram():
  # 64 pixels on 4 levels, unevenly used: equalization spreads them to span [0, 1].
  values = np.repeat(np.asarray([10, 20, 30, 40]) / 255, [40, 8, 8, 8])
  image = jnp.asarray(values.reshape(8, 8, 1), jnp.float32)
  out = np.asarray(trivial_augment._apply(OPERATIONS.index("equalize"), image, 0.0, 1.0))
  np.testing.assert_allclose(sorted(np.unique(out)), [0.0, 8 / 24, 16 / 24, 1.0], atol=1e-6)


def test_trivial_augment_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    trivial_augment.trivial_augment(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.uint8))
  with pytest.raises(ValueError, match="1 or 3"):
    trivial_augment.trivial_augment(jax.random.key(0), jnp.zeros((2, 8, 8, 2)))
