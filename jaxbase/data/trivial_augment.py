"""TrivialAugment (Müller and Hutter 2021) as a pure on-device function.

Each image gets one operation drawn uniformly from `OPERATIONS` and one
strength drawn uniformly from `num_bins` levels in [0, 1], each example with
its own key. The ranges are the paper's "wide" ones. Images are float in
[0, 1], shape [batch, height, width, channels] with 1 or 3 channels, and stay
in [0, 1]. Geometric operations fill uncovered pixels with 0 and sample the
nearest input pixel, as the reference implementation does with PIL.

Under `vmap`, `lax.switch` runs every operation on every image and selects one
result, so a batch costs about all operations once; on 32x32 images that is
small next to a ResNet train step.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

OPERATIONS = (
    "identity",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)

MAX_ROTATE_DEGREES = 135.0
MAX_SHEAR = 0.99
# 32 pixels on 32x32 images in the paper, so a shift of up to the image side;
# kept relative to the side so other image sizes get the same range.
MAX_TRANSLATE_FRACTION = 1.0
MAX_ENHANCE = 0.99  # Enhance factors lie in [1 - 0.99, 1 + 0.99].


def _gray(image):
  if image.shape[-1] == 1:
    return image
  weights = jnp.asarray([0.299, 0.587, 0.114], image.dtype)
  return (image @ weights)[..., None]


def _blend(degenerate, image, factor):
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _smooth(image):
  """The 3x3 smoothing of PIL's sharpness filter; border pixels are kept."""
  kernel = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], image.dtype) / 13.0
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  height, width = image.shape[:2]
  smoothed = sum(
      kernel[i, j] * padded[i : i + height, j : j + width] for i in range(3) for j in range(3)
  )
  border = jnp.ones((height, width), bool).at[1:-1, 1:-1].set(False)
  return jnp.where(border[:, :, None], image, smoothed)


def _equalize(image):
  """Histogram equalization of each channel over 256 levels."""
  levels = jnp.round(image * 255.0).astype(jnp.int32)

  def one_channel(channel):
    histogram = jnp.bincount(channel.ravel(), length=256)
    cdf = jnp.cumsum(histogram)
    cdf_min = jnp.min(jnp.where(histogram > 0, cdf, cdf[-1]))
    span = jnp.maximum(cdf[-1] - cdf_min, 1)
    table = jnp.clip((cdf - cdf_min) / span, 0.0, 1.0)
    # A constant channel (span 0) stays as it is.
    return jnp.where(cdf[-1] == cdf_min, channel / 255.0, table[channel])

  channels = [one_channel(levels[..., c]) for c in range(image.shape[-1])]
  return jnp.stack(channels, axis=-1).astype(image.dtype)


def _autocontrast(image):
  low = image.min(axis=(0, 1), keepdims=True)
  high = image.max(axis=(0, 1), keepdims=True)
  scaled = (image - low) / jnp.where(high > low, high - low, 1.0)
  return jnp.where(high > low, scaled, image)


def _affine(image, matrix, offset):
  """Samples output pixel p from input pixel `matrix @ (p - c) + c + offset` (nearest, fill 0)."""
  height, width, channels = image.shape
  center = jnp.asarray([(height - 1) / 2.0, (width - 1) / 2.0])
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  grid = jnp.stack([rows, cols], axis=-1).astype(jnp.float32) - center
  source = grid @ matrix.T + center + offset
  out = [
      ndimage.map_coordinates(
          image[..., c], [source[..., 0], source[..., 1]], order=0, mode="constant", cval=0.0
      )
      for c in range(channels)
  ]
  return jnp.stack(out, axis=-1)


def _apply(index, image, strength, sign):
  """Runs operation `OPERATIONS[index]` at `strength` in [0, 1] with direction `sign`."""
  factor = 1.0 + sign * strength * MAX_ENHANCE
  angle = sign * strength * MAX_ROTATE_DEGREES * math.pi / 180.0
  shear = sign * strength * MAX_SHEAR
  height, width = image.shape[:2]
  shift_rows = sign * strength * MAX_TRANSLATE_FRACTION * height
  shift_cols = sign * strength * MAX_TRANSLATE_FRACTION * width
  identity = jnp.eye(2)

  def rotate(x):
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return _affine(x, jnp.asarray([[cos, -sin], [sin, cos]]), jnp.zeros(2))

  branches = [
      lambda x: x,
      lambda x: _blend(jnp.zeros_like(x), x, factor),
      lambda x: _blend(jnp.broadcast_to(_gray(x), x.shape), x, factor),
      lambda x: _blend(jnp.full_like(x, _gray(x).mean()), x, factor),
      lambda x: _blend(_smooth(x), x, factor),
      # 8 bits kept at strength 0, down to 2 at strength 1.
      lambda x: _posterize(x, 8 - jnp.round(strength * 6).astype(jnp.int32)),
      # Pixels above the threshold 1 - strength are inverted.
      lambda x: jnp.where(x > 1.0 - strength, 1.0 - x, x),
      _autocontrast,
      _equalize,
      rotate,
      lambda x: _affine(x, identity.at[1, 0].set(shear), jnp.zeros(2)),
      lambda x: _affine(x, identity.at[0, 1].set(shear), jnp.zeros(2)),
      lambda x: _affine(x, identity, jnp.stack([0.0, shift_cols])),
      lambda x: _affine(x, identity, jnp.stack([shift_rows, 0.0])),
  ]
  return jax.lax.switch(index, branches, image).astype(image.dtype)


def _posterize(image, bits):
  levels = jnp.round(image * 255.0).astype(jnp.int32)
  mask = 256 - jnp.left_shift(1, 8 - bits)
  return (levels & mask).astype(image.dtype) / 255.0


@functools.partial(jax.jit, static_argnames=("num_bins",))
def trivial_augment(key: jax.Array, images: jax.Array, num_bins: int = 31) -> jax.Array:
  """Applies one random operation at a random strength to each image.

  Args:
    key: PRNG key.
    images: float images in [0, 1], [batch, height, width, channels], 1 or 3
      channels.
    num_bins: number of strength levels, spread evenly over [0, 1].

  Returns:
    Augmented images, same shape and dtype, in [0, 1].

  Raises:
    ValueError: on images that are not rank 4 floats with 1 or 3 channels, or
      `num_bins` < 2.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [batch, height, width, 1 or 3], got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"images must be float in [0, 1], got dtype {images.dtype}; convert uint8 pixels first"
    )
  if num_bins < 2:
    raise ValueError(f"num_bins must be >= 2, got {num_bins}")

  def augment_one(example_key, image):
    op_key, bin_key, sign_key = jax.random.split(example_key, 3)
    index = jax.random.randint(op_key, (), 0, len(OPERATIONS))
    strength = jax.random.randint(bin_key, (), 0, num_bins) / (num_bins - 1)
    sign = jnp.where(jax.random.bernoulli(sign_key), 1.0, -1.0)
    return _apply(index, image, strength, sign)

  return jax.vmap(augment_one)(jax.random.split(key, images.shape[0]), images)
