"""On-device image augmentation: random crops and horizontal flips.

Every function is a pure, jitted function of a PRNG key and a batch of images
[batch, height, width, channels], so it can run inside `jax.jit`, `jax.pmap`
or `jax.shard_map`. Each example draws its own randomness from
`jax.random.split(key, batch)`, so the same key always gives the same output.

Under `shard_map` or `pmap`, each device augments only its local batch. Passing
the same key on every device would give device 0's example `i` the same crop
as every other device's example `i`, so fold the device index into the key
first, e.g. `jax.random.fold_in(key, jax.lax.axis_index('data'))`.
"""

import functools

import jax
import jax.numpy as jnp

PAD_MODES = ("constant", "reflect", "edge")


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4:
    raise ValueError(
        "images must have rank 4 [batch, height, width, channels], got shape {images.shape}"
    )


@functools.partial(jax.jit, static_argnames=("padding", "mode"))
def random_crop(
    key: jax.Array, images: jax.Array, padding: int, mode: str = "constant"
) -> jax.Array:
  """Pad each image on all four sides, then crop back at a random offset.

  Each example gets its own offset, drawn uniformly from
  `[0, 2 * padding]` independently for rows and columns. With the default
  'constant' mode the border is zeros. The output has the input's shape and
  dtype, and every value is either an input value or zero.

  Args:
    key: PRNG key.
    images: Array of shape [batch, height, width, channels].
    padding: Pixels added on each side; 0 returns `images` unchanged. Static,
      so each value compiles once.
    mode: `jnp.pad` mode for the border: 'constant' (zeros), 'reflect' or
      'edge'. 'reflect' needs `padding < min(height, width)`.

  Returns:
    Cropped images, same shape and dtype as `images`.

  Raises:
    ValueError: On a negative `padding`, an unknown `mode`, a reflect
      padding too large for the image, or images that are not rank 4.
  """
  _check_images(images)
  if padding < 0:
    raise ValueError(f"padding must be non-negative, got {padding}")
  if mode not in PAD_MODES:
    raise ValueError(f"unknown pad mode {mode!r}; use one of {', '.join(PAD_MODES)}")
  batch, height, width, channels = images.shape
  if mode == "reflect" and padding >= min(height, width):
    raise ValueError(
        f"reflect padding {padding} needs images larger than {padding} "
        f"pixels, got {height}x{width}; lower padding or use mode='constant'"
    )
  if padding == 0:
    return images

  padded = jnp.pad(
      images,
      ((0, 0), (padding, padding), (padding, padding), (0, 0)),
      mode=mode,
  )

  def crop_one(example_key, image):
    offset = jax.random.randint(example_key, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  return jax.vmap(crop_one)(jax.random.split(key, batch), padded)


@jax.jit
def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Flip each image left to right with probability 0.5, independently.

  Calling it twice with the same key undoes the first call.

  Args:
    key: PRNG key.
    images: Array of shape [batch, height, width, channels].

  Returns:
    Images of the same shape and dtype.

  Raises:
    ValueError: If `images` is not rank 4.
  """
  _check_images(images)

  def flip_one(example_key, image):
    return jnp.where(jax.random.bernoulli(example_key), image[:, ::-1, :], image)

  return jax.vmap(flip_one)(jax.random.split(key, images.shape[0]), images)


@functools.partial(jax.jit, static_argnames=("padding",))
def crop_and_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Apply `random_crop` with zero padding, then `random_flip`.

  With the default `padding=4` on 32x32 images, this is the usual CIFAR-10
  training augmentation.

  Args:
    key: PRNG key. It is split so the crop and the flip draw independently.
    images: Array of shape [batch, height, width, channels].
    padding: Pixels of zero padding on each side before cropping.

  Returns:
    Augmented images, same shape and dtype as `images`.
  """
  crop_key, flip_key = jax.random.split(key)
  return random_flip(flip_key, random_crop(crop_key, images, padding))
