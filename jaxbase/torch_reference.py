"""PyTorch twins of jaxbase's CIFAR ResNets, to compare training speed with a reference.

Needs the optional `torch` extra (`pip install -e '.[torch]'`); nothing else in
jaxbase imports this module.

`TorchResNet` builds the same network as `jaxbase.models.ResNet` with basic
blocks and the CIFAR stem (resnet8, resnet20, ..., resnet110). It has a 3x3
stem convolution with BatchNorm and ReLU, then post-activation basic blocks,
global average pooling and a dense head. Where a block changes shape, its
shortcut is a strided 1x1 convolution plus BatchNorm. Convolutions have no
bias and pad symmetrically. BatchNorm uses epsilon 1e-5 and keeps 0.9 of the
old running average per step (PyTorch's momentum=0.1), and the model's first
layer normalizes [0, 1] pixels. `load_flax_variables` copies a jaxbase model's
variables into it, so both compute the same logits.

NOTE: PyTorch updates the running variance with the unbiased batch variance
and flax with the biased one, so running statistics drift apart slightly
during training. Logits in train and eval mode match for the same variables.
"""

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxbase.models.resnet import VARIANTS


def supported_models() -> list[str]:
  """Lists the jaxbase model names that have a PyTorch twin here."""
  return [
      name
      for name, variant in VARIANTS.items()
      if variant["block"] == "basic" and variant["stem"] == "cifar"
  ]


class BasicBlock(nn.Module):
  """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

  def __init__(self, in_channels: int, features: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, features, 3, stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv2d(features, features, 3, 1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
    self.projection = stride != 1 or in_channels != features
    if self.projection:
      self.shortcut_conv = nn.Conv2d(in_channels, features, 1, stride, bias=False)
      self.shortcut_bn = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    residual = torch.relu(self.bn1(self.conv1(x)))
    residual = self.bn2(self.conv2(residual))
    shortcut = self.shortcut_bn(self.shortcut_conv(x)) if self.projection else x
    return torch.relu(residual + shortcut)


class TorchResNet(nn.Module):
  """CIFAR ResNet with basic blocks, layer for layer the jaxbase `ResNet` of the same name.

  Args:
    name: a name from `supported_models()`, e.g. 'resnet20'.
    num_classes: size of the logits.
    mean: per-channel mean of [0, 1] input pixels; its length sets the input channels.
    std: per-channel standard deviation of [0, 1] input pixels.

  Raises:
    ValueError: for a model without a PyTorch twin, or `mean` and `std` of different lengths.
  """

  def __init__(self, name: str, num_classes: int, mean: Sequence[float], std: Sequence[float]):
    super().__init__()
    if name not in supported_models():
      raise ValueError(
          f"no PyTorch twin of model {name!r}; supported: {', '.join(supported_models())}"
      )
    if len(mean) != len(std):
      raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have the same length")
    variant = VARIANTS[name]
    channels = len(mean)
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    width = variant["stem_width"]
    self.stem_conv = nn.Conv2d(channels, width, 3, 1, padding=1, bias=False)
    self.stem_bn = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    blocks = collections.OrderedDict()
    for stage, (num_blocks, features) in enumerate(
        zip(variant["stage_sizes"], variant["stage_widths"])
    ):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks[f"stage{stage + 1}_block{index + 1}"] = BasicBlock(width, features, stride)
        width = features
    self.blocks = nn.Sequential(blocks)
    self.head = nn.Linear(width, num_classes)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        # He normal with fan_out, the init of jaxbase's ResNet convolutions.
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """Maps float32[batch, channels, height, width] pixels in [0, 1] to float32 logits."""
    x = (images - self.mean) / self.std
    x = torch.relu(self.stem_bn(self.stem_conv(x)))
    x = self.blocks(x)
    return self.head(x.mean(dim=(2, 3)))


def count_params(model: nn.Module) -> int:
  """Counts the trainable scalars (BatchNorm running statistics excluded)."""
  return sum(p.numel() for p in model.parameters())


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = np.asarray(value)
  return flat


def load_flax_variables(model: TorchResNet, variables: Mapping[str, Any]) -> None:
  """Copies a jaxbase ResNet's `params` and `batch_stats` into `model`, in place.

  Flax stores convolution kernels as [height, width, in, out] and dense
  kernels as [in, out]; PyTorch wants [out, in, height, width] and [out, in].

  Raises:
    ValueError: when a variable has no counterpart or the shapes differ.
  """
  renames = {
      ("params", "kernel"): "weight",
      ("params", "scale"): "weight",
      ("params", "bias"): "bias",
      ("batch_stats", "mean"): "running_mean",
      ("batch_stats", "var"): "running_var",
  }
  targets = dict(model.state_dict())
  loaded = set()
  for collection in ("params", "batch_stats"):
    for path, value in _flatten(variables.get(collection, {})).items():
      *modules, leaf = path
      if modules and modules[0].startswith("stage"):
        modules = ["blocks"] + modules
      name = ".".join(modules + [renames[(collection, leaf)]])
      if name not in targets:
        raise ValueError(f"flax variable {collection}/{'/'.join(path)} has no PyTorch twin {name}")
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2:
        value = value.T
      if tuple(value.shape) != tuple(targets[name].shape):
        raise ValueError(
            f"{name}: flax shape {value.shape} does not match PyTorch {tuple(targets[name].shape)}"
        )
      targets[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
      loaded.add(name)
  missing = [n for n in targets if n not in loaded and not n.endswith("num_batches_tracked")]
  missing = [n for n in missing if n not in ("mean", "std")]
  if missing:
    raise ValueError(f"PyTorch variables with no flax counterpart: {', '.join(missing)}")
  model.load_state_dict(targets)


def make_train_step(
    model: nn.Module,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
):
  """Builds `train_step(images, labels) -> loss` with SGD, Nesterov momentum and weight decay.

  Weight decay reaches only weights with two or more dimensions, as
  `jaxbase.optim.decay_mask` does, and is added to the gradient before
  momentum as in jaxbase's SGD. `images` are uint8 [batch, channels, height,
  width] and are converted to [0, 1] floats inside the step, as jaxbase's
  step does on the device.
  """
  decayed = [p for p in model.parameters() if p.ndim >= 2]
  others = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.SGD(
      [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
      lr=lr,
      momentum=momentum,
      nesterov=True,
  )
  loss_fn = nn.CrossEntropyLoss()

  def train_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images.float() / 255.0), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return train_step


def train_step_timer(
    name: str,
    *,
    batch_size: int,
    image_shape: Sequence[int],
    num_classes: int,
    channels_last: bool,
    device: str = "cpu",
) -> Callable[[int], float]:
  """Builds `name` with its optimizer on random uint8 images; returns a step timer.

  The timer runs train step `index` (alternating between two batches) and
  returns its wall-clock seconds, after the step has finished on any device.
  """
  height, width, channels = image_shape
  torch.manual_seed(0)
  model = TorchResNet(name, num_classes, (0.5,) * channels, (0.25,) * channels).to(device)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format).train()
  generator = torch.Generator().manual_seed(0)
  batches = [
      (
          torch.randint(0, 256, (batch_size, channels, height, width), generator=generator)
          .to(torch.uint8)
          .to(device)
          .contiguous(memory_format=memory_format),
          torch.randint(0, num_classes, (batch_size,), generator=generator).to(device),
      )
      for _ in range(2)
  ]
  train_step = make_train_step(model)

  def timed(index: int) -> float:
    start = time.perf_counter()
    loss = train_step(*batches[index % len(batches)])
    loss.item()  # Waits for the step to finish on any device.
    return time.perf_counter() - start

  return timed
