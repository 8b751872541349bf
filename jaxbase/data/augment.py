"""On-device augmentation: random crops, flips, cutout, mixup and cutmix of
images, and token dropout of text.

Every function is a pure, jitted function of a PRNG key and a batch of images
[batch, height, width, channels] (or token ids), so it can run inside
`jax.jit`, `jax.pmap` or `jax.shard_map`. Each example draws its own randomness from
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
        f"images must have rank 4 [batch, height, width, channels], got shape {images.shape}"
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


@functools.partial(jax.jit, static_argnames=("size",))
def cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """Zero a `size` x `size` square at a random center in each image (DeVries and Taylor 2017).

  The center is uniform over all pixels, so near a border the square is cut
  off by the edge and covers less area, as in the original method.

  Args:
    key: PRNG key.
    images: Array of shape [batch, height, width, channels].
    size: side of the square in pixels; 0 returns `images` unchanged.

  Returns:
    Images of the same shape and dtype.

  Raises:
    ValueError: On a negative `size` or images that are not rank 4.
  """
  _check_images(images)
  if size < 0:
    raise ValueError(f"cutout size must be non-negative, got {size}")
  if size == 0:
    return images
  batch, height, width, _ = images.shape
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]

  def cut_one(example_key, image):
    row_key, col_key = jax.random.split(example_key)
    center_row = jax.random.randint(row_key, (), 0, height)
    center_col = jax.random.randint(col_key, (), 0, width)
    top, left = center_row - size // 2, center_col - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(inside[:, :, None], jnp.zeros((), image.dtype), image)

  return jax.vmap(cut_one)(jax.random.split(key, batch), images)


def _check_labels(images: jax.Array, labels: jax.Array, num_classes: int) -> None:
  _check_images(images)
  if labels.shape != images.shape[:1]:
    raise ValueError(
        f"labels must have shape [batch] = {images.shape[:1]}, got {labels.shape}; pass integer "
        "class ids, not one-hot rows"
    )
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")


def _check_alpha(alpha: float, name: str) -> None:
  if not alpha > 0:
    raise ValueError(
        f"{name} alpha must be positive, got {alpha}; set it to 0 in the config to turn {name} off"
    )


@functools.partial(jax.jit, static_argnames=("num_classes", "alpha"))
def mixup(
    key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, alpha: float
) -> tuple[jax.Array, jax.Array]:
  """Blend each image and its one-hot label with a partner from the same batch (Zhang et al. 2018).

  One mixing weight `lam ~ Beta(alpha, alpha)` is drawn for the batch, and the
  partners come from a random permutation of the batch. Image `i` becomes
  `lam * x_i + (1 - lam) * x_partner`, and its target puts `lam` on `y_i` and
  `1 - lam` on `y_partner` (both on the same class when the labels agree).

  Args:
    key: PRNG key.
    images: float images [batch, height, width, channels].
    labels: int class ids [batch].
    num_classes: width of the target rows.
    alpha: Beta concentration, > 0; 0.2 to 1.0 are common.

  Returns:
    `(images, targets)`: the mixed images (same shape and dtype) and float32
    targets [batch, num_classes] whose rows sum to 1.
  """
  _check_labels(images, labels, num_classes)
  _check_alpha(alpha, "mixup")
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha)
  partner = jax.random.permutation(perm_key, images.shape[0])
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  mixed = lam * images + (1.0 - lam) * images[partner]
  targets = lam * onehot + (1.0 - lam) * onehot[partner]
  return mixed.astype(images.dtype), targets


@functools.partial(jax.jit, static_argnames=("num_classes", "alpha"))
def cutmix(
    key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, alpha: float
) -> tuple[jax.Array, jax.Array]:
  """Paste a random box from a partner image into each image (Yun et al. 2019).

  One `lam ~ Beta(alpha, alpha)` is drawn for the batch. The box has sides
  `sqrt(1 - lam)` times the image's, a uniformly random center, and is clipped
  at the borders. The label weight is the share of pixels each image
  contributes after clipping, so it matches the pasted area exactly.

  Args:
    key: PRNG key.
    images: images [batch, height, width, channels].
    labels: int class ids [batch].
    num_classes: width of the target rows.
    alpha: Beta concentration, > 0; 1.0 is the usual choice.

  Returns:
    `(images, targets)`: images of the same shape and dtype, and float32
    targets [batch, num_classes] whose rows sum to 1.
  """
  _check_labels(images, labels, num_classes)
  _check_alpha(alpha, "cutmix")
  batch, height, width, _ = images.shape
  lam_key, perm_key, row_key, col_key = jax.random.split(key, 4)
  lam = jax.random.beta(lam_key, alpha, alpha)
  partner = jax.random.permutation(perm_key, batch)

  ratio = jnp.sqrt(1.0 - lam)
  box_height = jnp.round(ratio * height).astype(jnp.int32)
  box_width = jnp.round(ratio * width).astype(jnp.int32)
  center_row = jax.random.randint(row_key, (), 0, height)
  center_col = jax.random.randint(col_key, (), 0, width)
  top = jnp.clip(center_row - box_height // 2, 0, height)
  bottom = jnp.clip(center_row + box_height - box_height // 2, 0, height)
  left = jnp.clip(center_col - box_width // 2, 0, width)
  right = jnp.clip(center_col + box_width - box_width // 2, 0, width)

  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  mixed = jnp.where(inside[None, :, :, None], images[partner], images)

  kept = 1.0 - inside.sum().astype(jnp.float32) / (height * width)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = kept * onehot + (1.0 - kept) * onehot[partner]
  return mixed, targets


def token_dropout(
    key: jax.Array,
    token_ids: jax.Array,
    padding_mask: jax.Array,
    *,
    rate: float,
    replace_id: int,
    num_special: int,
) -> jax.Array:
  """Replace each word token by `replace_id` with probability `rate` (text augmentation).

  Word tokens are real tokens (padding mask 1) with ids `>= num_special`;
  padding, [CLS], [SEP] and the other special tokens are never replaced. The
  sentence keeps its length, so the attention mask stays valid. Replacing by
  [MASK] rather than deleting the token also suits a model pretrained with
  masked-language modelling, which has learned what [MASK] stands for.

  Args:
    key: PRNG key; each token draws independently.
    token_ids: int[batch, length].
    padding_mask: [batch, length], 1 for real tokens and 0 for padding.
    rate: probability in [0, 1] that a word token is replaced.
    replace_id: the id written in its place, e.g. the tokenizer's [MASK].
    num_special: ids below it are special tokens.

  Returns:
    The token ids with the chosen tokens replaced, same shape and dtype.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"token dropout rate must be in [0, 1], got {rate}")
  if rate == 0.0:
    return token_ids
  words = padding_mask.astype(bool) & (token_ids >= num_special)
  dropped = words & jax.random.bernoulli(key, rate, token_ids.shape)
  return jnp.where(dropped, jnp.asarray(replace_id, token_ids.dtype), token_ids)
