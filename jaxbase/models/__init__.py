"""Model registry: build a Flax module from the `model` config section.

`MODELS` maps each model name to a factory `factory(num_classes, **attributes)`
that returns a `ResNet` with that name's stage layout; keyword arguments
override any `ResNet` attribute (e.g. `plain=True`, `dtype=jnp.bfloat16`).
`build_model` reads the same attributes from a config.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxbase.models.cnn import CNN, CNN_VARIANTS
from jaxbase.models.resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANTS,
    ResNet,
    normalize_images,
)

__all__ = [
    "CNN",
    "CNN_VARIANTS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DTYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "ResNet",
    "VARIANTS",
    "build_model",
    "count_params",
    "normalize_images",
]

# Compute dtype names accepted in `config.dtype`.
DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def _factory(
    module: type[nn.Module], name: str, variant: dict[str, Any]
) -> Callable[..., nn.Module]:
  def factory(num_classes: int, **attributes: Any) -> nn.Module:
    return module(num_classes=num_classes, **{**variant, **attributes})

  factory.__name__ = name
  factory.__qualname__ = name
  factory.__doc__ = f"Build `{module.__name__}` as {name}; keyword arguments override attributes."
  return factory


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: _factory(ResNet, name, variant) for name, variant in VARIANTS.items()},
    **{name: _factory(CNN, name, variant) for name, variant in CNN_VARIANTS.items()},
}


def build_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    axis_name: str | None = "data",
) -> nn.Module:
  """Build the model that a `model` config section describes.

  Args:
    config: the `model` config section, with these fields. A missing or
      None field takes its default.
      - `name`: a key of `MODELS` (required).
      - `plain`: bool, default False.
      - `dtype`: compute dtype, 'float32' (default), 'bfloat16' or
        'float16'. Parameters stay float32.
      - `zero_init_residual`: bool, default False.
      - `dropout_rate`: float, default 0.0. Only preact_resnet18 and
        wrn28_10 accept a nonzero rate.
      - `drop_path_rate`: stochastic depth of the deepest block, default 0.0
        (ResNets with shortcuts only).
      - `head_dropout_rate`: dropout before the head, default 0.0 (ResNets).
      - `mean`, `std`: per-channel sequences for [0, 1] pixels. The default
        is CIFAR-10 statistics for CIFAR models and ImageNet statistics for
        ImageNet models.
    num_classes: number of logits.
    axis_name: mapped axis for cross-replica BatchNorm statistics in
      training; None when training runs outside a mapped axis.

  Returns:
    An unbound `ResNet` module; call `init` and `apply` on it.

  Raises:
    ValueError: if `name` or `dtype` is unknown, or `dropout_rate` is
      nonzero for a model without dropout.
  """
  name = config.get("name")
  if name is None:
    raise ValueError(f"model config has no 'name'; set it to one of: {', '.join(MODELS)}")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")

  dtype_name = config.get("dtype") or "float32"
  if dtype_name not in DTYPES:
    raise ValueError(f"unknown model dtype {dtype_name!r}; expected one of: {', '.join(DTYPES)}")

  dropout_rate = float(config.get("dropout_rate") or 0.0)
  if name in CNN_VARIANTS:
    return _build_cnn(config, name, num_classes, dropout_rate, DTYPES[dtype_name])
  variant = VARIANTS[name]
  if dropout_rate != 0 and variant["block"] != "preact_basic":
    models_with_dropout = [
        other for other, spec in VARIANTS.items() if spec["block"] == "preact_basic"
    ]
    raise ValueError(
        f"model {name!r} has no dropout but dropout_rate={dropout_rate}; "
        f"set dropout_rate=0 or use one of: {', '.join(models_with_dropout)}"
    )

  attributes: dict[str, Any] = dict(
      plain=bool(config.get("plain") or False),
      zero_init_residual=bool(config.get("zero_init_residual") or False),
      dropout_rate=dropout_rate,
      drop_path_rate=float(config.get("drop_path_rate") or 0.0),
      head_dropout_rate=float(config.get("head_dropout_rate") or 0.0),
      dtype=DTYPES[dtype_name],
      param_dtype=jnp.float32,
      axis_name=axis_name,
  )
  # ConfigDict may hold lists, and tuples keep the module hashable.
  for field in ("mean", "std"):
    value = config.get(field)
    if value is not None:
      attributes[field] = tuple(float(v) for v in value)
  return MODELS[name](num_classes, **attributes)


def _build_cnn(config, name: str, num_classes: int, dropout_rate: float, dtype) -> nn.Module:
  for field in ("plain", "zero_init_residual", "drop_path_rate", "head_dropout_rate"):
    if config.get(field):
      raise ValueError(
          f"model {name!r} has no shortcuts, so {field}=True does not apply; set it to False"
      )
  attributes: dict[str, Any] = dict(dropout_rate=dropout_rate, dtype=dtype, param_dtype=jnp.float32)
  for field in ("mean", "std"):
    value = config.get(field)
    if value is not None:
      attributes[field] = tuple(float(v) for v in value)
  return MODELS[name](num_classes, **attributes)


def count_params(params) -> int:
  """Count the scalars in a pytree of arrays.

  Pass `variables['params']` to leave out BatchNorm's `batch_stats`. Works
  on the `jax.ShapeDtypeStruct` leaves that `jax.eval_shape` returns, so
  large models can be counted without allocating them.

  Args:
    params: pytree whose leaves have a `shape`.

  Returns:
    Total number of elements over all leaves.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
