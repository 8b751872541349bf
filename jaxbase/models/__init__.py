"""Model registry: build a Flax module from the `model` config section.

`MODELS` maps each model name to a factory `factory(num_classes, **attributes)`
that returns the module with that name's sizes: a `ResNet` stage layout, a
`CNN`, a `FastNet` width (`fastnet`, `fastnet_s`), a BERT variant (`bert_tiny`
... `bert_base`, which also need `vocab_size` and `max_length`) or a ViT
variant (`vit_s/4`: size S, 4x4 patches). Keyword arguments override any
module attribute (e.g. `plain=True`, `dtype=jnp.bfloat16`). `build_model`
reads the same attributes from a config.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxbase.kernels import conv as kernel_conv
from jaxbase.models.cnn import CNN, CNN_VARIANTS
from jaxbase.models.fastnet import FASTNET_VARIANTS, FastNet, fastnet_multiply_adds
from jaxbase.models.transformer import (
    BERT_VARIANTS,
    VIT_VARIANTS,
    BertClassifier,
    BertForMaskedLM,
    VisionTransformer,
    bert_variant,
    vit_variant,
)
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
    "BERT_VARIANTS",
    "BertClassifier",
    "BertForMaskedLM",
    "CNN",
    "CNN_VARIANTS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DTYPES",
    "FASTNET_VARIANTS",
    "FastNet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "ResNet",
    "TASKS",
    "VARIANTS",
    "VIT_VARIANTS",
    "VisionTransformer",
    "build_model",
    "count_params",
    "fastnet_multiply_adds",
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


# Patch sizes registered for each ViT size; 4 suits 32x32 images, 16 suits 224x224.
VIT_PATCH_SIZES = (4, 8, 16)
BERT_MODELS = {f"bert_{size}": bert_variant(size) for size in BERT_VARIANTS}
VIT_MODELS = {
    f"vit_{size.lower()}/{patch}": vit_variant(f"{size}/{patch}")
    for size in VIT_VARIANTS
    for patch in VIT_PATCH_SIZES
}

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: _factory(ResNet, name, variant) for name, variant in VARIANTS.items()},
    **{name: _factory(CNN, name, variant) for name, variant in CNN_VARIANTS.items()},
    **{name: _factory(FastNet, name, variant) for name, variant in FASTNET_VARIANTS.items()},
    **{name: _factory(BertClassifier, name, variant) for name, variant in BERT_MODELS.items()},
    **{name: _factory(VisionTransformer, name, variant) for name, variant in VIT_MODELS.items()},
}

# Training objectives: class logits ('classification'), or vocabulary logits
# at masked positions ('mlm', BERT models only).
TASKS = ("classification", "mlm")


def build_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    axis_name: str | None = "data",
    vocab_size: int | None = None,
    task: str = "classification",
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
      - `conv_impl`: convolution kernels of the image models, 'auto'
        (default: oneDNN on the CPU backend when available, else XLA),
        'onednn' or 'xla'; see `jaxbase.kernels.conv`.
      - `mean`, `std`: per-channel sequences for [0, 1] pixels. The default
        is CIFAR-10 statistics for CIFAR models and ImageNet statistics for
        ImageNet models.
      Transformers (bert_*, vit_*) also read `attention_dropout_rate`,
      `drop_path_rate` (default 0) and `pre_norm` (default: False for BERT,
      always True for ViT); BERT reads `max_length` (required) and `pool`
      ('cls' by default, or 'mean'), and ViT reads `pool` ('token' by
      default, or 'gap'). `plain` and
      `zero_init_residual` must be False.
      FastNets (fastnet, fastnet_s) read `dtype`, `mean` and `std`; `plain`,
      `zero_init_residual` and the three dropout rates must be off.
    num_classes: number of logits; ignored for the 'mlm' task.
    axis_name: mapped axis for cross-replica BatchNorm statistics in
      training; None when training runs outside a mapped axis.
    vocab_size: vocabulary size of the tokenizer; required by BERT models.
    task: 'classification', or 'mlm' for `BertForMaskedLM`.

  Returns:
    An unbound module; call `init` and `apply` on it.

  Raises:
    ValueError: if `name`, `dtype` or `task` is unknown, a field does not
      apply to the model, or `dropout_rate` is nonzero for a model without
      dropout.
  """
  name = config.get("name")
  if name is None:
    raise ValueError(f"model config has no 'name'; set it to one of: {', '.join(MODELS)}")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")

  dtype_name = config.get("dtype") or "float32"
  if dtype_name not in DTYPES:
    raise ValueError(f"unknown model dtype {dtype_name!r}; expected one of: {', '.join(DTYPES)}")

  conv_impl = config.get("conv_impl") or "auto"
  if conv_impl not in kernel_conv.IMPLS:
    raise ValueError(
        f"unknown model.conv_impl {conv_impl!r}; expected one of: {', '.join(kernel_conv.IMPLS)}"
    )

  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")
  if name in BERT_MODELS or name in VIT_MODELS:
    return _build_transformer(
        config, name, num_classes, DTYPES[dtype_name], vocab_size, task, conv_impl
    )
  if task != "classification":
    raise ValueError(
        f"task {task!r} needs a BERT model, got {name!r}; use one of: " + ", ".join(BERT_MODELS)
    )

  dropout_rate = float(config.get("dropout_rate") or 0.0)
  if name in CNN_VARIANTS:
    return _build_cnn(config, name, num_classes, dropout_rate, DTYPES[dtype_name], conv_impl)
  if name in FASTNET_VARIANTS:
    return _build_fastnet(
        config, name, num_classes, dropout_rate, DTYPES[dtype_name], axis_name, conv_impl
    )
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
      conv_impl=conv_impl,
  )
  # ConfigDict may hold lists, and tuples keep the module hashable.
  for field in ("mean", "std"):
    value = config.get(field)
    if value is not None:
      attributes[field] = tuple(float(v) for v in value)
  return MODELS[name](num_classes, **attributes)


def _build_cnn(
    config, name: str, num_classes: int, dropout_rate: float, dtype, conv_impl: str
) -> nn.Module:
  for field in ("plain", "zero_init_residual", "drop_path_rate", "head_dropout_rate"):
    if config.get(field):
      raise ValueError(
          f"model {name!r} has no shortcuts, so {field}=True does not apply; set it to False"
      )
  attributes: dict[str, Any] = dict(
      dropout_rate=dropout_rate, dtype=dtype, param_dtype=jnp.float32, conv_impl=conv_impl
  )
  for field in ("mean", "std"):
    value = config.get(field)
    if value is not None:
      attributes[field] = tuple(float(v) for v in value)
  return MODELS[name](num_classes, **attributes)


def _build_fastnet(
    config,
    name: str,
    num_classes: int,
    dropout_rate: float,
    dtype,
    axis_name: str | None,
    conv_impl: str,
) -> nn.Module:
  if dropout_rate:
    raise ValueError(f"model {name!r} has no dropout but dropout_rate={dropout_rate}; set it to 0")
  resnet_only = (
      ("plain", False),
      ("zero_init_residual", False),
      ("drop_path_rate", 0),
      ("head_dropout_rate", 0),
  )
  for field, off in resnet_only:
    value = config.get(field)
    if value:
      raise ValueError(f"{field}={value!r} applies to ResNets only, not {name!r}; set it to {off}")
  attributes: dict[str, Any] = dict(
      dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name, conv_impl=conv_impl
  )
  for field in ("mean", "std"):
    value = config.get(field)
    if value is not None:
      attributes[field] = tuple(float(v) for v in value)
  return MODELS[name](num_classes, **attributes)


def _build_transformer(
    config, name: str, num_classes: int, dtype, vocab_size: int | None, task: str, conv_impl: str
) -> nn.Module:
  for field in ("plain", "zero_init_residual"):
    if config.get(field):
      raise ValueError(f"{field}=True applies to ResNets only, not {name!r}; set it to False")
  attributes: dict[str, Any] = dict(
      dropout_rate=float(config.get("dropout_rate") or 0.0),
      attention_dropout_rate=float(config.get("attention_dropout_rate") or 0.0),
      drop_path_rate=float(config.get("drop_path_rate") or 0.0),
      dtype=dtype,
      param_dtype=jnp.float32,
  )
  if name in VIT_MODELS:
    if task != "classification":
      raise ValueError(f"task {task!r} needs a BERT model, got {name!r}")
    if config.get("pre_norm") is False:
      raise ValueError(f"{name} is a pre-LayerNorm model; remove model.pre_norm=False")
    attributes["pool"] = config.get("pool") or "token"
    attributes["conv_impl"] = conv_impl
    for field in ("mean", "std"):
      value = config.get(field)
      if value is not None:
        attributes[field] = tuple(float(v) for v in value)
    return MODELS[name](num_classes, **attributes)

  if vocab_size is None:
    raise ValueError(
        f"{name} is a text model and needs vocab_size, the vocabulary size of a tokenizer; "
        "train it on a text data source (data.source='tsv' or 'tfds_text'), or pick an image "
        "model such as resnet20 or vit_s/4 for image data"
    )
  max_length = config.get("max_length")
  if not max_length:
    raise ValueError(f"{name} needs model.max_length, the longest token sequence it reads")
  attributes.update(
      vocab_size=int(vocab_size),
      max_length=int(max_length),
      pre_norm=bool(config.get("pre_norm") or False),
  )
  if task == "mlm":
    if config.get("pool") not in (None, "cls"):
      raise ValueError(f"model.pool={config.pool!r} applies to classifiers; remove it for MLM")
    return BertForMaskedLM(**BERT_MODELS[name], **attributes)
  attributes["pool"] = config.get("pool") or "cls"
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
