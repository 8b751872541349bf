"""Tests for jaxbase.data.augment (random crops and flips on device)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxbase.data import augment


def _random_images(batch=16, height=8, width=8, channels=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, height, width, channels))


def _distinct_images(batch, height, width, channels=1):
  """Images whose pixels are all distinct and positive, so a crop's position is unique."""
  count = batch * height * width * channels
  values = np.arange(1, count + 1, dtype=np.float32) / count
  return values.reshape(batch, height, width, channels)


def _find_offsets(padded: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
  height, width = crop.shape[:2]
  matches = []
  for top, left in itertools.product(
      range(padded.shape[0] - height + 1), range(padded.shape[1] - width + 1)
  ):
    if np.array_equal(padded[top : top + height, left : left + width], crop):
      matches.append((top, left))
  return matches


def test_same_key_same_output():
  images = _random_images()
  key = jax.random.key(1)
  np.testing.assert_array_equal(
      augment.crop_and_flip(key, images), augment.crop_and_flip(key, images)
  )


def test_different_keys_differ():
  images = _random_images()
  first = augment.crop_and_flip(jax.random.key(1), images)
  second = augment.crop_and_flip(jax.random.key(2), images)
  assert not np.array_equal(first, second)


def test_raw_uint32_key_accepted():
  images = _random_images()
  out = augment.crop_and_flip(jax.random.PRNGKey(0), images)
  assert out.shape == images.shape


def test_crop_padding_zero_is_identity():
  images = _random_images()
  np.testing.assert_array_equal(augment.random_crop(jax.random.key(0), images, 0), images)


def test_flip_twice_is_identity():
  images = _random_images()
  key = jax.random.key(3)
  twice = augment.random_flip(key, augment.random_flip(key, images))
  np.testing.assert_array_equal(twice, images)


def test_shape_dtype_and_range_preserved():
  for dtype in (jnp.float32, jnp.bfloat16):
    images = _random_images().astype(dtype)
    out = augment.crop_and_flip(jax.random.key(0), images, padding=4)
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_crop_is_slice_of_padded_image():
  images = _distinct_images(batch=64, height=5, width=6)
  padding = 2
  out = np.asarray(augment.random_crop(jax.random.key(7), images, padding))
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  offsets = []
  for example in range(len(images)):
    matches = _find_offsets(padded[example], out[example])
    assert len(matches) == 1, (example, matches)
    offsets.append(matches[0])
  # Offsets are drawn per example, so a batch of 64 shows many of the 25.
  assert len(set(offsets)) > 10


def test_crop_offsets_cover_full_range():
  images = _distinct_images(batch=400, height=3, width=3)
  padding = 1
  out = np.asarray(augment.random_crop(jax.random.key(0), images, padding))
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = {_find_offsets(padded[i], out[i])[0] for i in range(len(images))}
  assert offsets == set(itertools.product(range(3), range(3)))


def test_crop_known_offset():
  # With padding 1 on a 1x1 image, the output pixel is the original value
  # exactly when the drawn offset is (1, 1), and zero otherwise.
  images = jnp.ones((200, 1, 1, 1))
  out = np.asarray(augment.random_crop(jax.random.key(5), images, 1))
  keys = jax.random.split(jax.random.key(5), 200)
  offsets = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 3))(keys))
  expected = np.all(offsets == 1, axis=1).astype(np.float32)
  np.testing.assert_array_equal(out[:, 0, 0, 0], expected)


def test_crop_reflect_mode():
  images = _distinct_images(batch=32, height=6, width=6)
  padding = 2
  out = np.asarray(augment.random_crop(jax.random.key(1), images, padding, mode="reflect"))
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="reflect")
  for example in range(len(images)):
    assert _find_offsets(padded[example], out[example]), example
  # Reflection copies image pixels, so no zeros appear.
  assert out.min() > 0


def test_flip_mirrors_about_half():
  images = _distinct_images(batch=1000, height=2, width=3)
  out = np.asarray(augment.random_flip(jax.random.key(0), images))
  flipped = np.all(out == images[:, :, ::-1, :], axis=(1, 2, 3))
  kept = np.all(out == images, axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  assert 0.45 < flipped.mean() < 0.55


def test_crop_and_flip_uint8():
  images = jnp.full((4, 8, 8, 3), 200, jnp.uint8)
  out = augment.crop_and_flip(jax.random.key(0), images, padding=2)
  assert out.dtype == jnp.uint8
  assert set(np.unique(np.asarray(out)).tolist()) <= {0, 200}


def test_no_recompile_for_new_keys():
  images = _random_images(batch=5, height=7, width=9)
  before = augment.crop_and_flip._cache_size()
  for seed in range(4):
    augment.crop_and_flip(jax.random.key(seed), images, padding=3)
  assert augment.crop_and_flip._cache_size() - before == 1


def test_runs_under_jit():
  images = _random_images()
  key = jax.random.key(4)
  jitted = jax.jit(lambda k, x: augment.crop_and_flip(k, x, padding=2))
  np.testing.assert_array_equal(jitted(key, images), augment.crop_and_flip(key, images, 2))


def test_runs_under_shard_map():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should provide 8 CPU devices"
  mesh = Mesh(np.asarray(devices), ("data",))
  images = _random_images(batch=16)
  key = jax.random.key(9)

  def per_device(images):
    # Folding in the device index gives every device different crops.
    device_key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    return augment.crop_and_flip(device_key, images, padding=2)

  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  out = np.asarray(mapped(images))

  assert out.shape == images.shape
  for device in range(8):
    rows = slice(2 * device, 2 * device + 2)
    expected = augment.crop_and_flip(jax.random.fold_in(key, device), images[rows], padding=2)
    np.testing.assert_array_equal(out[rows], expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"padding": -1}, "padding must be non-negative"),
        ({"padding": 2, "mode": "wrap"}, "unknown pad mode 'wrap'"),
        ({"padding": 8, "mode": "reflect"}, "reflect padding 8 needs images larger"),
    ],
)
def test_crop_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    augment.random_crop(jax.random.key(0), _random_images(), **kwargs)


def test_rejects_unbatched_image():
  with pytest.raises(ValueError, match="rank 4"):
    augment.random_flip(jax.random.key(0), jnp.zeros((8, 8, 3)))


def _sentences(num_rows=256, length=24, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, num_rows)
  padding_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  token_ids = rng.integers(5, 100, (num_rows, length)).astype(np.int32)
  token_ids[:, 0] = 2  # [CLS]
  token_ids[np.arange(num_rows), lengths - 1] = 3  # [SEP]
  return jnp.asarray(token_ids * padding_mask), jnp.asarray(padding_mask)


def test_token_dropout_replaces_word_tokens_at_rate():
  token_ids, padding_mask = _sentences()
  dropped = augment.token_dropout(
      jax.random.PRNGKey(0), token_ids, padding_mask, rate=0.25, replace_id=4, num_special=5
  )
  token_ids, padding_mask, dropped = map(np.asarray, (token_ids, padding_mask, dropped))
  words = (padding_mask == 1) & (token_ids >= 5)
  changed = dropped != token_ids
  assert not (changed & ~words).any()  # Padding, [CLS] and [SEP] stay.
  np.testing.assert_array_equal(dropped[changed], 4)
  # About 3,300 word tokens: the binomial standard deviation of the fraction is 0.0075.
  assert abs(changed.sum() / words.sum() - 0.25) < 0.03


def test_token_dropout_edge_rates_and_keys():
  token_ids, padding_mask = _sentences(num_rows=8)
  kwargs = dict(replace_id=4, num_special=5)
  key = jax.random.PRNGKey(1)
  np.testing.assert_array_equal(
      augment.token_dropout(key, token_ids, padding_mask, rate=0.0, **kwargs), token_ids
  )
  everything = np.asarray(augment.token_dropout(key, token_ids, padding_mask, rate=1.0, **kwargs))
  words = (np.asarray(padding_mask) == 1) & (np.asarray(token_ids) >= 5)
  np.testing.assert_array_equal(everything[words], 4)
  first = augment.token_dropout(key, token_ids, padding_mask, rate=0.5, **kwargs)
  again = augment.token_dropout(key, token_ids, padding_mask, rate=0.5, **kwargs)
  other = augment.token_dropout(jax.random.PRNGKey(2), token_ids, padding_mask, rate=0.5, **kwargs)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  with pytest.raises(ValueError, match="token dropout rate must be in \\[0, 1\\], got 1.5"):
    augment.token_dropout(key, token_ids, padding_mask, rate=1.5, **kwargs)
