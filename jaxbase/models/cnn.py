"""Small convolutional networks without shortcuts, for MNIST-sized inputs and baselines."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxbase.kernels import conv as kernel_conv
from jaxbase.models.resnet import normalize_images

# Fashion-MNIST training-set statistics of [0, 1] pixels.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


class CNN(nn.Module):
  """Stages of convolution, ReLU and 2x2 max-pooling, then a hidden dense layer.

  Attributes:
    num_classes: size of the logits.
    features: output channels of each convolution stage.
    kernel_size: side of the square convolution kernels.
    hidden: width of the dense layer before the logits.
    dropout_rate: dropout before the logits, active when `train` is True.
    mean, std: per-channel statistics of [0, 1] input pixels.
    dtype: compute dtype; logits are float32 regardless.
    param_dtype: parameter dtype.
    conv_impl: convolution kernels: 'auto' (oneDNN on the CPU backend when
      available, else XLA), 'onednn' or 'xla'; see `jaxbase.kernels.conv`.
  """

  num_classes: int
  features: Sequence[int] = (32, 64)
  kernel_size: int = 5
  hidden: int = 1024
  dropout_rate: float = 0.0
  mean: tuple[float, ...] = FASHION_MNIST_MEAN
  std: tuple[float, ...] = FASHION_MNIST_STD
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool):
    """Maps float[batch, height, width, channels] pixels in [0, 1] to float32 logits."""
    if images.ndim != 4:
      raise ValueError(
          f"images must have rank 4 [batch, height, width, channels], got shape {images.shape}; "
          "add a channel axis with images[..., None] for grayscale"
      )
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
          f"images must be float in [0, 1], got {images.dtype}; convert with "
          "images.astype(jnp.float32) / 255"
      )
    x = normalize_images(images, self.mean, self.std).astype(self.dtype)
    for index, width in enumerate(self.features):
      x = nn.Conv(
          width,
          (self.kernel_size, self.kernel_size),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          conv_general_dilated=kernel_conv.conv_fn(self.conv_impl),
          name=f"conv{index}",
      )(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(
        nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden")(x)
    )
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
    )(x)
    return logits.astype(jnp.float32)


# Model name -> CNN attributes.
CNN_VARIANTS: dict[str, dict[str, Any]] = {
    # The MNIST network of Madry et al. 2018 ("Towards Deep Learning Models
    # Resistant to Adversarial Attacks"): 5x5 convolutions with 32 and 64
    # channels, each followed by 2x2 max-pooling, and a 1024-unit dense layer.
    "cnn_madry": dict(features=(32, 64), kernel_size=5, hidden=1024),
    # Half the channels, 3x3 kernels and 128 hidden units: about 1/16 of the
    # parameters, for CPU runs and tests.
    "cnn_small": dict(features=(16, 32), kernel_size=3, hidden=128),
}
