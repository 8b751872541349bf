"""ResNet family for CIFAR and ImageNet, as pure Flax linen modules.

One `ResNet` module covers every variant; `VARIANTS` maps a model name to the
stage layout that defines it:

* CIFAR ResNet-20/32/44/56/110 (He et al. 2016, "Deep Residual Learning for
  Image Recognition", CIFAR-10 section): 3x3 stem with 16 channels, three
  stages of n post-activation basic blocks with 16/32/64 channels,
  depth = 6n + 2. Where a block changes shape, its shortcut is a 1x1
  convolution plus BatchNorm (the paper's option B), not the zero-padded
  identity (option A) that the paper used for CIFAR. This adds 2,752
  parameters to every depth, so ResNet-20 has 272,474 instead of about 0.27M.
* Pre-activation ResNet-18 for CIFAR (He et al. 2016, "Identity Mappings in
  Deep Residual Networks"): 3x3 stem with 64 channels, four stages of two
  pre-activation basic blocks with 64/128/256/512 channels.
* WideResNet-28-10 (Zagoruyko & Komodakis 2016, "Wide Residual Networks"):
  3x3 stem with 16 channels, three stages of four pre-activation basic blocks
  with 160/320/640 channels and dropout between the two convolutions.
* ImageNet ResNet-18/34/50/101/152, v1.5: 7x7 stride-2 stem and 3x3 stride-2
  max-pool, basic blocks (18, 34) or bottleneck blocks (50, 101, 152) whose
  stride-2 step sits in the 3x3 convolution, not in the first 1x1.

Every model takes `images: float[batch, height, width, channels] in [0, 1]`,
normalizes them with per-channel `mean` and `std`, and returns float32 logits
`[batch, num_classes]`. With `plain=True` the same layers run with every
shortcut removed (no identity add and no projection), which isolates the
effect of the residual connections.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxbase.kernels import conv as kernel_conv
from jaxbase.models.batchnorm import BatchNorm

ModuleDef = Any
Dtype = Any

# CIFAR-10 training-set statistics of [0, 1] pixels, per RGB channel.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# ImageNet statistics as used by torchvision's pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BLOCK_TYPES = ("basic", "bottleneck", "preact_basic")
STEM_TYPES = ("cifar", "imagenet")

# He normal with fan_out, untruncated, as torchvision's kaiming_normal_ does
# for ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def normalize_images(images, mean: Sequence[float], std: Sequence[float]):
  """Normalize pixels per channel as `(images - mean) / std`.

  Args:
    images: float[batch, height, width, channels] in [0, 1].
    mean: per-channel mean, one value per channel of `images`.
    std: per-channel standard deviation, one positive value per channel.

  Returns:
    float32[batch, height, width, channels].

  Raises:
    ValueError: if `mean` or `std` does not have one entry per channel, or
      if a `std` entry is not positive.
  """
  channels = images.shape[-1]
  if len(mean) != len(std):
    raise ValueError(
        f"mean and std must have the same length, got mean={tuple(mean)} "
        f"({len(mean)} values) and std={tuple(std)} ({len(std)} values)"
    )
  if len(mean) != channels:
    raise ValueError(
        f"mean={tuple(mean)} and std={tuple(std)} have {len(mean)} values "
        f"but images of shape {tuple(images.shape)} have {channels} "
        f"channel(s); pass mean and std with one value per channel"
    )
  if any(s <= 0 for s in std):
    raise ValueError(f"std values must be positive, got std={tuple(std)}")
  mean_array = jnp.asarray(mean, dtype=jnp.float32)
  std_array = jnp.asarray(std, dtype=jnp.float32)
  return (images.astype(jnp.float32) - mean_array) / std_array


def check_images(images) -> None:
  """Raise ValueError unless `images` is a rank-4 floating-point batch.

  Args:
    images: the model input, expected float[batch, height, width, channels].
  """
  if images.ndim != 4:
    raise ValueError(
        f"images must have rank 4 [batch, height, width, channels], got "
        f"shape {tuple(images.shape)}; add a channel axis for grayscale "
        f"images, e.g. images[..., None]"
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"images must be float in [0, 1], got {images.dtype}; convert "
        f"with images.astype(jnp.float32) / 255"
    )


def _same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Symmetric padding, as PyTorch's padding=k//2 gives, so stride-2 layers
  # sample the same pixels as torchvision's ResNets. Flax's 'SAME' pads
  # (0, 1) for even inputs at stride 2.
  pad = kernel_size // 2
  return ((pad, pad), (pad, pad))


class BasicBlock(nn.Module):
  """Post-activation basic block: two 3x3 convolutions with BatchNorm.

  Computes `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, where the
  shortcut is the identity, or a strided 1x1 convolution plus BatchNorm when
  the shape changes. With `zero_init_residual`, the scale of `bn2` starts at
  zero so the block computes `relu(shortcut(x))` at init.
  """

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  plain: bool = False
  zero_init_residual: bool = False
  drop_path_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    """Apply the block to `x: [batch, height, width, in_channels]`.

    Returns:
      [batch, height / strides, width / strides, features].
    """
    residual = self.conv(
        self.features,
        (3, 3),
        (self.strides, self.strides),
        padding=_same_padding(3),
        name="conv1",
    )(x)
    residual = self.norm(name="bn1")(residual, relu=True)
    residual = self.conv(self.features, (3, 3), padding=_same_padding(3), name="conv2")(residual)
    last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    return _last_norm(self, residual, x, self.features, last_scale_init, name="bn2")


class BottleneckBlock(nn.Module):
  """Post-activation bottleneck block, ResNet v1.5.

  Computes 1x1 (features) -> 3x3 (features, stride) -> 1x1 (4 * features),
  each followed by BatchNorm, with ReLU after the first two and after the
  shortcut add. The stride sits in the 3x3 convolution (v1.5), not in the
  first 1x1 (v1), as in torchvision's ResNets. With `zero_init_residual`,
  the scale of `bn3` starts at zero.
  """

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  plain: bool = False
  zero_init_residual: bool = False
  expansion: int = 4
  drop_path_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    """Apply the block to `x: [batch, height, width, in_channels]`.

    Returns:
      [batch, height / strides, width / strides, 4 * features].
    """
    out_features = self.features * self.expansion
    residual = self.conv(self.features, (1, 1), name="conv1")(x)
    residual = self.norm(name="bn1")(residual, relu=True)
    residual = self.conv(
        self.features,
        (3, 3),
        (self.strides, self.strides),
        padding=_same_padding(3),
        name="conv2",
    )(residual)
    residual = self.norm(name="bn2")(residual, relu=True)
    residual = self.conv(out_features, (1, 1), name="conv3")(residual)
    last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    return _last_norm(self, residual, x, out_features, last_scale_init, name="bn3")


def _last_norm(block: nn.Module, residual, x, out_features: int, scale_init, name: str):
  """Return `relu(norm(residual) + shortcut(x))` for a post-activation block.

  Without stochastic depth, the shortcut add and the ReLU run inside the
  BatchNorm, in one fused step (`jaxbase.models.batchnorm`). `plain` blocks
  apply the ReLU alone. The shortcut's own layers are created first, so the
  fused and unfused forms have the same variables.
  """
  norm = block.norm(scale_init=scale_init, name=name)
  if block.plain:
    return norm(residual, relu=True)
  shortcut = _projection_shortcut(block, x, out_features)
  if block.drop_path_rate == 0 or block.deterministic:
    return norm(residual, shortcut, relu=True)
  return nn.relu(_drop_path(block, norm(residual)) + shortcut)


def _drop_path(block: nn.Module, residual):
  """Stochastic depth (Huang et al. 2016): drops the whole residual branch of an example.

  A kept branch is scaled by 1 / (1 - rate), so eval (which keeps every
  branch unscaled) sees the same expected output.
  """
  if block.drop_path_rate == 0 or block.deterministic:
    return residual
  # One Bernoulli draw per example, shared by all positions and channels.
  return nn.Dropout(block.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
      residual, deterministic=False
  )


def _projection_shortcut(block: nn.Module, x, out_features: int):
  """Return `x`, or a strided 1x1 conv plus BatchNorm of it if the shape changes.

  Called inside a compact block, so the layers it creates belong to `block`.
  """
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  shortcut = block.conv(out_features, (1, 1), (block.strides, block.strides), name="shortcut_conv")(
      x
  )
  return block.norm(name="shortcut_bn")(shortcut)


class PreActBasicBlock(nn.Module):
  """Pre-activation basic block, as in pre-activation ResNets and WideResNets.

  Computes `conv2(dropout(relu(bn2(conv1(a))))) + shortcut` with
  `a = relu(bn1(x))`. The shortcut is `x`, or a strided 1x1 convolution of
  `a` (no BatchNorm) when the shape changes. There is no BatchNorm at the end
  of the block, so `zero_init_residual` zero-initializes the kernel of
  `conv2` instead, and the block returns exactly its shortcut at init.
  """

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  plain: bool = False
  zero_init_residual: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    """Apply the block to `x: [batch, height, width, in_channels]`.

    Dropout draws from the 'dropout' rng collection when `train` is True.

    Returns:
      [batch, height / strides, width / strides, features].
    """
    activated = self.norm(name="bn1")(x, relu=True)
    residual = self.conv(
        self.features,
        (3, 3),
        (self.strides, self.strides),
        padding=_same_padding(3),
        name="conv1",
    )(activated)
    residual = self.norm(name="bn2")(residual, relu=True)
    if self.dropout_rate > 0:
      residual = nn.Dropout(self.dropout_rate, deterministic=not train)(residual)
    last_kernel_init = nn.initializers.zeros if self.zero_init_residual else conv_kernel_init
    residual = self.conv(
        self.features,
        (3, 3),
        padding=_same_padding(3),
        kernel_init=last_kernel_init,
        name="conv2",
    )(residual)
    if self.plain:
      return residual
    residual = _drop_path(self, residual)
    if self.strides == 1 and x.shape[-1] == self.features:
      return residual + x
    # The projection reads the pre-activated input, so the shortcut and
    # residual paths share bn1 and its ReLU.
    shortcut = self.conv(self.features, (1, 1), (self.strides, self.strides), name="shortcut_conv")(
        activated
    )
    return residual + shortcut


class ResNet(nn.Module):
  """Residual network built from a stage layout; see `VARIANTS` for the named ones.

  Attributes:
    stage_sizes: number of blocks in each stage. Every stage after the first
      halves the spatial size with a stride-2 first block.
    stage_widths: channels of each stage. For bottleneck blocks this is the
      inner width, and the stage outputs 4 times as many channels.
    num_classes: size of the logits.
    block: 'basic', 'bottleneck' (both post-activation) or 'preact_basic'.
      Pre-activation networks add a BatchNorm and ReLU before the pooling.
    stem: 'cifar' (3x3 conv) or 'imagenet' (7x7 stride-2 conv and 3x3
      stride-2 max-pool). Post-activation stems add BatchNorm and ReLU after
      the conv. 'preact_basic' blocks are defined only with the 'cifar' stem.
    stem_width: output channels of the stem convolution.
    plain: drop every shortcut (identity and projection), keeping all other
      layers.
    zero_init_residual: start each block as its shortcut (Goyal et al. 2017,
      "Accurate, Large Minibatch SGD"). Post-activation blocks zero the scale
      of their last BatchNorm, and pre-activation blocks zero their last conv
      kernel. Invalid with `plain`, where it would zero every block output.
    dropout_rate: dropout between the two convolutions of each
      pre-activation block. Other block types reject a nonzero rate.
    drop_path_rate: stochastic depth. Block l of L drops its residual branch
      with probability `drop_path_rate * l / L` per example in training.
      Invalid with `plain`, which has no branch to skip to.
    head_dropout_rate: dropout on the pooled features before the head.
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

  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  num_classes: int
  block: str = "basic"
  stem: str = "cifar"
  stem_width: int = 16
  plain: bool = False
  zero_init_residual: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_dropout_rate: float = 0.0
  mean: tuple[float, ...] = CIFAR10_MEAN
  std: tuple[float, ...] = CIFAR10_STD
  axis_name: str | None = "data"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  def _check_config(self):
    if self.block not in BLOCK_TYPES:
      raise ValueError(f"unknown block type {self.block!r}; expected one of {BLOCK_TYPES}")
    if self.stem not in STEM_TYPES:
      raise ValueError(f"unknown stem type {self.stem!r}; expected one of {STEM_TYPES}")
    if self.block == "preact_basic" and self.stem != "cifar":
      raise ValueError(
          f"block 'preact_basic' is defined only with stem 'cifar', got stem {self.stem!r}"
      )
    if len(self.stage_sizes) != len(self.stage_widths):
      raise ValueError(
          f"stage_sizes {tuple(self.stage_sizes)} and stage_widths "
          f"{tuple(self.stage_widths)} must have the same length"
      )
    if self.dropout_rate != 0 and self.block != "preact_basic":
      raise ValueError(
          f"dropout_rate={self.dropout_rate} is not supported with "
          f"{self.block!r} blocks; only 'preact_basic' blocks "
          f"(preact_resnet18, wrn28_10) have dropout, so set dropout_rate=0"
      )
    for field in ("dropout_rate", "drop_path_rate", "head_dropout_rate"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f"{field} must be in [0, 1), got {getattr(self, field)}")
    if self.plain and self.drop_path_rate:
      raise ValueError(
          f"drop_path_rate={self.drop_path_rate} skips residual branches, but plain=True "
          "removes the shortcuts they would skip to; set drop_path_rate=0 or plain=False"
      )
    if self.plain and self.zero_init_residual:
      raise ValueError(
          "zero_init_residual=True needs shortcuts, but plain=True removes "
          "them and every block would output zeros at init; set one of "
          "them to False"
      )

  @nn.compact
  def __call__(self, images, train: bool):
    """Compute class logits.

    Args:
      images: float[batch, height, width, channels] in [0, 1], with
        `channels == len(mean)`.
      train: use batch statistics in BatchNorm (and update the
        'batch_stats' collection, which must be mutable) and apply dropout
        from the 'dropout' rng collection. False uses running statistics
        and no dropout.

    Returns:
      float32[batch, num_classes] logits.

    Raises:
      ValueError: on a model configuration that is invalid, or on images
        that are not rank 4, not floating point, or whose channel count
        does not match `mean` and `std`.
    """
    self._check_config()
    check_images(images)

    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        conv_general_dilated=kernel_conv.conv_fn(self.conv_impl),
    )
    norm = functools.partial(
        BatchNorm,
        use_running_average=not train,
        axis_name=self.axis_name,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )

    x = normalize_images(images, self.mean, self.std).astype(self.dtype)
    x = self._stem(x, conv, norm)

    total_blocks = sum(self.stage_sizes)
    block_number = 0
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for index in range(num_blocks):
        block_number += 1
        strides = 2 if stage > 0 and index == 0 else 1
        name = f"stage{stage + 1}_block{index + 1}"
        common = dict(
            features=width,
            strides=strides,
            conv=conv,
            norm=norm,
            plain=self.plain,
            zero_init_residual=self.zero_init_residual,
            drop_path_rate=self.drop_path_rate * block_number / total_blocks,
            deterministic=not train,
            name=name,
        )
        if self.block == "basic":
          x = BasicBlock(**common)(x)
        elif self.block == "bottleneck":
          x = BottleneckBlock(**common)(x)
        else:
          x = PreActBasicBlock(dropout_rate=self.dropout_rate, **common)(x, train)

    if self.block == "preact_basic":
      x = norm(name="final_bn")(x, relu=True)
    x = jnp.mean(x, axis=(1, 2))
    if self.head_dropout_rate:
      x = nn.Dropout(self.head_dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
    )(x)
    return logits.astype(jnp.float32)

  def _stem(self, x, conv, norm):
    if self.stem == "imagenet":
      x = conv(
          self.stem_width,
          (7, 7),
          (2, 2),
          padding=_same_padding(7),
          name="stem_conv",
      )(x)
    else:
      x = conv(self.stem_width, (3, 3), padding=_same_padding(3), name="stem_conv")(x)
    # Pre-activation blocks start with their own BatchNorm and ReLU.
    if self.block != "preact_basic":
      x = norm(name="stem_bn")(x, relu=True)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_same_padding(3))
    return x


def _cifar_resnet(blocks_per_stage: int) -> dict[str, Any]:
  return dict(
      stage_sizes=(blocks_per_stage,) * 3,
      stage_widths=(16, 32, 64),
      block="basic",
      stem="cifar",
      stem_width=16,
  )


def _imagenet_resnet(stage_sizes: tuple[int, ...], block: str) -> dict[str, Any]:
  return dict(
      stage_sizes=stage_sizes,
      stage_widths=(64, 128, 256, 512),
      block=block,
      stem="imagenet",
      stem_width=64,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
  )


# Model name -> `ResNet` attributes that define it. The CIFAR variants use
# CIFAR-10 statistics for mean and std (the `ResNet` default) and the ImageNet
# variants use ImageNet statistics.
VARIANTS: dict[str, dict[str, Any]] = {
    # ResNet-8 (one block per stage) is not in He et al.; it is the smallest
    # member of the family, for tests and quick checks.
    "resnet8": _cifar_resnet(1),
    "resnet20": _cifar_resnet(3),
    "resnet32": _cifar_resnet(5),
    "resnet44": _cifar_resnet(7),
    "resnet56": _cifar_resnet(9),
    "resnet110": _cifar_resnet(18),
    "preact_resnet18": dict(
        stage_sizes=(2, 2, 2, 2),
        stage_widths=(64, 128, 256, 512),
        block="preact_basic",
        stem="cifar",
        stem_width=64,
    ),
    # Depth 28 = 6 * 4 + 4 (4 blocks per stage), widen factor 10 on 16/32/64.
    "wrn28_10": dict(
        stage_sizes=(4, 4, 4),
        stage_widths=(160, 320, 640),
        block="preact_basic",
        stem="cifar",
        stem_width=16,
    ),
    "resnet18": _imagenet_resnet((2, 2, 2, 2), "basic"),
    "resnet34": _imagenet_resnet((3, 4, 6, 3), "basic"),
    "resnet50": _imagenet_resnet((3, 4, 6, 3), "bottleneck"),
    "resnet101": _imagenet_resnet((3, 4, 23, 3), "bottleneck"),
    "resnet152": _imagenet_resnet((3, 8, 36, 3), "bottleneck"),
}
