"""A small, fast residual network for 32x32 images, after published CIFAR-10 speed records.

The layout follows the networks of CIFAR-10 training-speed records (e.g.
Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU"): few layers,
wide channels, and max-pooling instead of strided convolutions. Two
differences from that paper's network: the stem here is a learned 3x3
convolution, not a fixed 2x2 whitening one, and each stage adds its pair of
convolutions back to its input, where the paper's network has no shortcut.

    stem:   3x3 conv -> BatchNorm -> GELU                      (32x32)
    stage:  3x3 conv -> 2x2 max-pool -> BatchNorm -> GELU      (halves the side)
            x + GELU(BN(conv(GELU(BN(conv(x))))))              (residual pair)
    head:   global max-pool -> dense without bias -> logits * logit_scale

Each stage pools before its BatchNorm, so the normalization and activation
run on a quarter of the positions of the convolution's output.

Activation: GELU, as in the paper. Its cost is elementwise and small
next to the convolutions here, so the choice costs little on a CPU.

Logit scale: the head's outputs are multiplied by a fixed 1/8 (the paper
uses 1/9). The factor shrinks the head's gradient as well as its output, so
an SGD step on the head changes the logits 64 times less than without it: a
lower learning rate for the head alone, with no extra optimizer setting.

Multiply-adds per 32x32 image, from the layer shapes: every convolution
counted at 9 taps per output position, and the head. BatchNorm, GELU and
pooling are elementwise and left out. For `stem_width` s and `stage_widths`
(a, b, c) the sum is

    1024 * 27 s + 1024 * 9 s a + 2 * 256 * 9 a^2 + 256 * 9 a b
      + 2 * 64 * 9 b^2 + 64 * 9 b c + 2 * 16 * 9 c^2 + c * num_classes

and `fastnet_multiply_adds` computes it. With 10 classes:

* `fastnet`: stem 32, stages 64/256/256 (the paper's stage widths),
  208.5M multiply-adds, 3,195,680 parameters. Sized for accelerators.
* `fastnet_s`: 7/16 of every width (stem 14, stages 28/112/112), 40.1M
  multiply-adds, 613,382 parameters. ResNet-20 costs 40.8M by the same
  count. Scaling in steps of 1/32, the next width up (15/32) would cost
  46.0M. For CPU runs.

XLA's CPU cost analysis (jax 0.10.2) counts only the taps that fall inside
the image, plus the elementwise work. Its flops / 2 are lower but in the same
order: 184.2M for `fastnet`, 36.7M for `fastnet_s` and 37.9M for ResNet-20.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxbase.kernels import conv as kernel_conv
from jaxbase.models.batchnorm import BatchNorm
from jaxbase.models.resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    check_images,
    conv_kernel_init,
    normalize_images,
)

ModuleDef = Any


class FastStage(nn.Module):
  """One stage: a conv that changes the width, 2x2 max-pooling, then a residual pair.

  Computes `y = act(bn(pool(conv(x))))` and returns
  `y + act(bn2(conv2(act(bn1(conv1(y))))))`.
  """

  features: int
  conv: ModuleDef
  norm: ModuleDef
  activation: Any

  @nn.compact
  def __call__(self, x):
    """Apply the stage to `x: [batch, height, width, in_channels]`.

    Returns:
      [batch, height / 2, width / 2, features].
    """
    x = self.conv(self.features, name="conv")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = self.activation(self.norm(name="bn")(x))
    residual = self.conv(self.features, name="res_conv1")(x)
    residual = self.activation(self.norm(name="res_bn1")(residual))
    residual = self.conv(self.features, name="res_conv2")(residual)
    residual = self.activation(self.norm(name="res_bn2")(residual))
    return x + residual


class FastNet(nn.Module):
  """Stem, max-pooling residual stages and a scaled bias-free head; see the module docstring.

  Attributes:
    num_classes: size of the logits.
    stage_widths: output channels of each stage. Every stage halves the
      height and width, so three stages take 32x32 inputs to 4x4.
    stem_width: output channels of the stem convolution.
    logit_scale: fixed factor on the head's outputs.
    mean: per-channel mean of [0, 1] input pixels, subtracted first.
    std: per-channel standard deviation of [0, 1] input pixels.
    axis_name: mapped axis over which BatchNorm averages batch statistics in
      training, e.g. 'data' under `jax.shard_map`. Set None when calling
      with `train=True` outside a mapped axis. Eval and `init` with
      `train=False` ignore it.
    dtype: compute dtype, e.g. jnp.bfloat16. Logits are float32 regardless.
    param_dtype: dtype of the parameters and batch statistics.
    conv_impl: convolution kernels: 'auto' (oneDNN on the CPU backend when
      available, else XLA), 'onednn' or 'xla'; see `jaxbase.kernels.conv`.
  """

  num_classes: int
  stage_widths: Sequence[int] = (64, 256, 256)
  stem_width: int = 32
  logit_scale: float = 0.125
  mean: tuple[float, ...] = CIFAR10_MEAN
  std: tuple[float, ...] = CIFAR10_STD
  axis_name: str | None = "data"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool):
    """Compute class logits.

    Args:
      images: float[batch, height, width, channels] in [0, 1], with
        `channels == len(mean)`. Height and width must be divisible by
        2 ** len(stage_widths).
      train: use batch statistics in BatchNorm and update the 'batch_stats'
        collection, which must be mutable. False uses running statistics.

    Returns:
      float32[batch, num_classes] logits.

    Raises:
      ValueError: on images that are not rank 4, not floating point, whose
        channel count does not match `mean` and `std`, or whose sides do not
        divide by 2 ** len(stage_widths).
    """
    self._check_images(images)

    conv = functools.partial(
        nn.Conv,
        kernel_size=(3, 3),
        padding="SAME",
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        conv_general_dilated=kernel_conv.conv_fn(self.conv_impl),
    )
    # The same BatchNorm settings as the ResNets, so `axis_name` and
    # `batch_stats` behave alike in every step and in transfer.
    norm = functools.partial(
        BatchNorm,
        use_running_average=not train,
        axis_name=self.axis_name,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    activation = functools.partial(nn.gelu, approximate=False)

    x = normalize_images(images, self.mean, self.std).astype(self.dtype)
    x = conv(self.stem_width, name="stem_conv")(x)
    x = activation(norm(name="stem_bn")(x))
    for index, width in enumerate(self.stage_widths):
      x = FastStage(width, conv, norm, activation, name=f"stage{index + 1}")(x)

    x = jnp.max(x, axis=(1, 2))
    logits = nn.Dense(
        self.num_classes,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
    )(x)
    return logits.astype(jnp.float32) * self.logit_scale

  def _check_images(self, images):
    check_images(images)
    divisor = 2 ** len(self.stage_widths)
    height, width = images.shape[1:3]
    if height % divisor or width % divisor:
      raise ValueError(
          f"images of {height}x{width} pixels do not halve evenly through "
          f"{len(self.stage_widths)} max-pooling stages; use sides divisible by {divisor}, "
          "e.g. 32x32"
      )


def fastnet_multiply_adds(
    stem_width: int,
    stage_widths: Sequence[int],
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
) -> int:
  """Count the multiply-adds of one forward pass of a `FastNet` on one image.

  Counts the convolutions and the head; BatchNorm, GELU and pooling are
  elementwise and left out.

  Args:
    stem_width: output channels of the stem.
    stage_widths: output channels of each stage.
    num_classes: size of the logits.
    image_size: height and width of the square input.
    channels: input channels.

  Returns:
    Multiply-adds per image.
  """
  side = image_size
  total = side * side * 9 * channels * stem_width
  previous = stem_width
  for width in stage_widths:
    total += side * side * 9 * previous * width  # At full size, before the pool.
    side //= 2
    total += 2 * side * side * 9 * width * width  # The residual pair.
    previous = width
  return total + previous * num_classes


# FastNet attributes of each registered model name.
FASTNET_VARIANTS: dict[str, dict[str, Any]] = {
    "fastnet": dict(stem_width=32, stage_widths=(64, 256, 256)),
    "fastnet_s": dict(stem_width=14, stage_widths=(28, 112, 112)),
}
